"""The chunk table of packed sequences (engines/packed.py) against a plain Python re-cut of the same offsets."""
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator.engines import packed


def python_table(cu, L):
    """Chunks of L per sequence, in order: (start, count, sequence, first, last) each."""
    rows = []
    for i in range(len(cu) - 1):
        starts = list(range(cu[i], cu[i + 1], L))
        for j, s in enumerate(starts):
            rows.append((s, min(L, cu[i + 1] - s), i, j == 0, j == len(starts) - 1))
    return rows


def random_offsets(rng, T, n):
    """n + 1 offsets; with n > 2 the second sequence is empty."""
    cuts = np.sort(rng.integers(0, T + 1, size=n - 1))
    if n > 2:
        cuts[1] = cuts[0]
    return [0, *cuts.tolist(), T]


@pytest.mark.parametrize("T, n, L", [(1, 1, 16), (37, 1, 16), (37, 5, 16), (100, 9, 8), (64, 4, 16), (5, 5, 32)])
def test_chunk_table_matches_a_python_recut(rng, T, n, L):
    for _ in range(5):
        cu = random_offsets(rng, T, n)
        n_seq = n
        table = packed.chunk_table(np.asarray(cu, "int32"), T, n_seq, L)
        got = [tuple(int(x) for x in ops.convert_to_numpy(c)) for c in
               (table.start, table.count, table.sequence, table.first, table.last)]
        expected = python_table(cu, L)
        NC = packed.max_chunks(T, n_seq, L)
        assert len(got[0]) == NC >= len(expected)
        for c, row in enumerate(expected):
            assert tuple(col[c] for col in got) == (row[0], row[1], row[2], int(row[3]), int(row[4])), (cu, c)
        for c in range(len(expected), NC):   # unused chunks hold nothing and are neither first nor last
            assert (got[1][c], got[3][c], got[4][c]) == (0, 0, 0)
        flags = ops.convert_to_numpy(table.packed)
        np.testing.assert_array_equal(flags[:, packed.START], got[0])
        np.testing.assert_array_equal(flags[:, packed.FLAGS], np.asarray(got[3]) * packed.FIRST
                                      + np.asarray(got[4]) * packed.LAST)
        lengths = np.diff(cu)
        np.testing.assert_array_equal(ops.convert_to_numpy(table.has_chunks), lengths > 0)
        last_chunk = ops.convert_to_numpy(table.last_chunk)
        for i in np.flatnonzero(lengths):
            assert last_chunk[i] == max(c for c, row in enumerate(expected) if row[2] == i)
        slots = ops.convert_to_numpy(packed.token_positions(np.asarray(cu, "int32"), T, L))
        for t in range(T):   # each token sits in its chunk's slot
            c, offset = divmod(int(slots[t]), L)
            assert expected[c][0] + offset == t
