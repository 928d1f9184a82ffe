"""The level table (Settings.mask_table: masks.level_table): its entries against their definitions, and the chunk
kernels that read it (forward, fused and split backward) against the float64 oracle on the cases the built masks
are tested on: strong decays and masks (w = -1e9 and +100), shared start states, T not a multiple of the chunk,
chunks of several sub-blocks, float32 and bfloat16, head sizes 16 to 128, packed sequences.

Interpreted on CPU tensors (TRITON_INTERPRET=1) at tiny shapes; on a CUDA machine the same tests run compiled.
"""
import numpy as np
import pytest
import torch

from rwkv6_keras_operator.engines.triton import masks
from rwkv6_keras_operator.engines.triton.settings import Settings
from tests import mask_definitions
from tests.engines.portable.test_varlen import PACKINGS
from tests.engines.triton import test_varlen
from tests.engines.triton.test_kernels import check

pytestmark = pytest.mark.requires("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLE = Settings(mask_table=True)
BOTH = [TABLE, Settings(mask_table=True, backward_split=True)]
IDS = ["fused backward", "split backward"]


@pytest.mark.parametrize("C", [16, 32, 64])
def test_table_holds_every_levels_masks(C):
    """Entry [shift - 1, FACTOR] is factor_mask and [shift - 1, SPAN] span_mask of level 2^shift, as 0/1 bfloat16."""
    table = masks.level_table(C, DEVICE)
    assert table.dtype == torch.bfloat16 and tuple(table.shape) == (C.bit_length() - 2, 2, C, C)
    got = table.float().cpu().numpy()
    for shift in range(1, C.bit_length() - 1):
        for kind, name in ((masks.FACTOR.value, "factor_mask"), (masks.SPAN.value, "span_mask")):
            want = mask_definitions.ALL[name](C, shift).astype(np.float32)
            bad = np.argwhere(got[shift - 1, kind] != want)
            assert bad.size == 0, f"{name}, C={C}, shift={shift}: {len(bad)} entries differ, first {bad[0]}"
    assert masks.level_table(C, DEVICE) is table   # written once per device and size


@pytest.mark.parametrize("settings", BOTH, ids=IDS)
@pytest.mark.parametrize("decay,B,T,H,N,n_state,state_map", [
    ("masks", 2, 80, 1, 32, 3, [2, 2]),        # shared start state; three chunks, the last partial
    ("strong", 1, 64, 2, 16, None, None),      # two exact chunks, no start state
])
def test_matches_oracle(settings, decay, B, T, H, N, n_state, state_map, seed):
    check(B, T, H, N, decay, n_state=n_state, state_map=state_map, seed=seed, settings=settings)


@pytest.mark.parametrize("settings", BOTH, ids=IDS)
def test_bfloat16(settings, seed):
    check(1, 80, 1, 16, "masks", dtype="bfloat16", n_state=1, seed=seed, settings=settings)


@pytest.mark.parametrize("N", [64, 128])
def test_head_sizes(N, seed):
    check(1, 40, 1, N, "strong", n_state=1, seed=seed, settings=TABLE)


def test_sub_blocks_of_longer_chunks(seed):
    """Sub-blocks of 16 rows (a table of 3 levels) in chunks of 64, the states carried between them."""
    check(2, 150, 1, 32, "masks", n_state=2, seed=seed, settings=Settings(chunk=64, sub_block=16, mask_table=True))


def test_packed_sequences(seed):
    for cu in PACKINGS[:2]:
        test_varlen.check(cu, "float32", settings=TABLE, seed=seed)


@pytest.mark.parametrize("settings", BOTH, ids=IDS)
def test_the_kernels_read_the_table(settings, monkeypatch):
    """The tests above would pass on built masks too: with the table's factor masks zeroed (every F_h = 1), the
    kernels that read it must miss the oracle."""
    zeros = torch.zeros(4, 2, 32, 32, dtype=torch.bfloat16, device=DEVICE)
    monkeypatch.setitem(masks._TABLES, (32, str(zeros.device)), zeros)   # the key of the kernels' device
    with pytest.raises(AssertionError):
        check(1, 64, 1, 16, "strong", n_state=1, settings=settings)


def test_settings_check_the_flag():
    with pytest.raises(ValueError, match="mask_table must be a bool"):
        Settings(mask_table=1)
    assert TABLE.key != Settings().key   # a separate op call under torch.compile
