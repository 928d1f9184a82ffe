"""Packed sequences (`cu_seqlens`): the chunks re-cut per sequence, shared by every engine (docs/math.md, "Packed
sequences").

One row of T tokens holds n sequences, cu_seqlens[i]:cu_seqlens[i + 1]. Sequence i gets ceil(len_i / L) chunks of
its own, laid side by side in sequence order; no chunk straddles a boundary, so each engine's chunk math runs on
them unchanged and only the scan over chunks restarts at each sequence's first chunk. The number of chunks depends
on the values of cu_seqlens; its bound `max_chunks(T, n, L)` does not (T and n are static), so grids and buffers
are sized by the bound and the chunks past the last used one are empty (no tokens).

Everything here is `keras.ops` on the active backend's tensors (under jit, tf.function or torch.compile too).
"""
from typing import NamedTuple

from keras import ops

# The columns of ChunkTable.packed, one int32 row per chunk, for kernels that read the table from memory.
START, COUNT, SEQUENCE, FLAGS = range(4)
FIRST, LAST = 1, 2   # bits of the FLAGS column: the chunk is its sequence's first / last


def max_chunks(T, n, L):
    """The most chunks n sequences of T tokens in all can need with chunks of L: each sequence wastes at most L - 1
    slots of its last chunk, and there are never more chunks than tokens."""
    return max(1, min(T, (T + n * (L - 1)) // L))


class ChunkTable(NamedTuple):
    """Where the tokens of n packed sequences go in NC = max_chunks(T, n, L) chunks of L. All int32 or bool.

    Per chunk (NC,): start, its first token; count, its tokens (0 for an unused chunk); sequence, the sequence it
    belongs to (n - 1 for unused chunks: harmless, they hold no token); first / last, whether it is its sequence's
    first / last chunk (never for unused chunks); packed (NC, 4) int32: start, count, sequence and the flags
    (FIRST | LAST bits), the same table as one array.
    Per sequence (n,): last_chunk, the index of its last chunk (any valid index if it has none); has_chunks, len_i > 0.
    """
    start: object
    count: object
    sequence: object
    first: object
    last: object
    packed: object
    last_chunk: object
    has_chunks: object


def sequence_chunks(cu_seqlens, L):
    """Per sequence of cu_seqlens ((n + 1,) ints): its first token, the token after its last, and chunk_cu (n + 1,),
    the chunk offsets (sequence i has chunks chunk_cu[i] .. chunk_cu[i + 1] - 1, ceil(len_i / L) of them). int32."""
    cu = ops.cast(cu_seqlens, "int32")
    starts, ends = cu[:-1], cu[1:]
    chunks_per_sequence = (ends - starts + (L - 1)) // L
    chunk_cu = ops.concatenate([ops.zeros((1,), "int32"), ops.cast(ops.cumsum(chunks_per_sequence), "int32")])
    return starts, ends, chunk_cu


def chunk_table(cu_seqlens, T, n, L):
    """The ChunkTable of cu_seqlens ((n + 1,) ints, 0 = cu[0] <= ... <= cu[n] = T; not checked here)."""
    starts, ends, chunk_cu = sequence_chunks(cu_seqlens, L)
    chunk = ops.arange(max_chunks(T, n, L), dtype="int32")
    # a chunk's sequence: how many sequences end (in chunks) at or before it; empty sequences are skipped
    sequence = ops.cast(ops.minimum(ops.searchsorted(chunk_cu[1:], chunk, side="right"), n - 1), "int32")
    first_chunk = ops.take(chunk_cu, sequence)
    used = chunk < chunk_cu[n]
    start = ops.take(starts, sequence) + (chunk - first_chunk) * L
    count = ops.where(used, ops.clip(ops.take(ends, sequence) - start, 0, L), 0)
    start = ops.where(used, start, T)
    first = ops.logical_and(used, ops.equal(chunk, first_chunk))
    last = ops.logical_and(used, ops.equal(chunk + 1, ops.take(chunk_cu, sequence + 1)))
    flags = ops.cast(first, "int32") * FIRST + ops.cast(last, "int32") * LAST
    packed = ops.stack([start, count, sequence, flags], axis=1)
    return ChunkTable(start=start, count=count, sequence=sequence, first=first, last=last, packed=packed,
                      last_chunk=ops.maximum(chunk_cu[1:] - 1, 0), has_chunks=ends > starts)


def token_positions(cu_seqlens, T, L):
    """(T,) int32: the slot of each token in the chunks laid side by side (chunk * L + offset in the chunk)."""
    starts, ends, chunk_cu = sequence_chunks(cu_seqlens, L)
    t = ops.arange(T, dtype="int32")
    sequence = ops.cast(ops.searchsorted(ends, t, side="right"), "int32")   # how many sequences end at or before t
    return ops.take(chunk_cu, sequence) * L + t - ops.take(starts, sequence)


def final_states(ends, table, start_states):
    """The n final states from the end states of the chunks: ends (NC, ...) float32; an empty sequence returns its
    start state (start_states (n, ...) or None for zeros)."""
    finals = ops.take(ends, table.last_chunk, axis=0)
    mask = ops.reshape(table.has_chunks, (-1,) + (1,) * (len(finals.shape) - 1))
    return ops.where(mask, finals, 0.0 if start_states is None else start_states)
