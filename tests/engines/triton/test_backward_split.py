"""The split backward (Settings.backward_split: backward_split.py, a rows kernel and a keys kernel) against the
float64 oracle, on the cases the fused backward is tested on (test_kernels.py, test_varlen.py): strong decays and
masks (w = -1e9 and +100), shared start states, T not a multiple of the chunk, chunks of several sub-blocks (both
kernels carry a state), the loss on y alone, float32 and bfloat16, head sizes 16 to 128, packed sequences. T = 1 is
left out: the forward there is the decode step, the backward the same chunked one (test_kernels.test_single_step).

Interpreted on CPU tensors (TRITON_INTERPRET=1) at tiny shapes; on a CUDA machine the same tests run compiled.
"""
import pytest

from rwkv6_keras_operator.engines.triton import backward
from rwkv6_keras_operator.engines.triton.settings import Settings
from tests.engines.portable.test_varlen import PACKINGS
from tests.engines.triton import test_varlen
from tests.engines.triton.test_kernels import check

pytestmark = pytest.mark.requires("triton")

SPLIT = Settings(backward_split=True)


@pytest.mark.parametrize("decay,B,T,H,N,n_state,state_map", [
    ("masks", 2, 80, 1, 32, 3, [2, 2]),        # shared start state; three chunks, the last partial
    ("strong", 1, 64, 2, 16, None, None),      # two exact chunks, no start state
    ("normal", 1, 150, 1, 16, 1, [0]),         # five chunks, the last partial
])
def test_matches_oracle(decay, B, T, H, N, n_state, state_map, seed):
    check(B, T, H, N, decay, n_state=n_state, state_map=state_map, seed=seed, settings=SPLIT)


def test_bfloat16(seed):
    check(1, 80, 1, 16, "masks", dtype="bfloat16", n_state=1, seed=seed, settings=SPLIT)


@pytest.mark.parametrize("with_init", [True, False], ids=["init_state", "no init_state"])
def test_loss_on_y_alone(with_init, seed):
    check(2, 80, 1, 16, "masks", n_state=2 if with_init else None, with_dstate=False, seed=seed, settings=SPLIT)


@pytest.mark.parametrize("N", [64, 128])
def test_head_sizes(N, seed):
    check(1, 40, 1, N, "strong", n_state=1, seed=seed, settings=SPLIT)


def test_sub_blocks_of_longer_chunks(seed):
    """Chunks of four sub-blocks: each kernel moves S (the rows kernel) or dS (both) to its own sub-block."""
    check(2, 150, 1, 32, "masks", n_state=2, seed=seed, settings=Settings(chunk=64, sub_block=16, backward_split=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_sequences(dtype, seed):
    """Packed sequences (VARLEN): the kernels of unused chunks return at once, the rest read the chunk table."""
    for cu in PACKINGS[:2]:
        test_varlen.check(cu, dtype, settings=SPLIT, seed=seed)


def test_the_flag_runs_the_split_kernels(monkeypatch):
    """The tests above would pass on the fused kernel too: the flag must reach launch_backward_split."""
    calls = []
    split = backward.launch_backward_split
    monkeypatch.setattr(backward, "launch_backward_split", lambda *a, **kw: calls.append(1) or split(*a, **kw))
    check(1, 40, 1, 16, "masks", n_state=1, settings=SPLIT)
    check(1, 40, 1, 16, "masks", n_state=1, settings=Settings())
    assert len(calls) == 1


def test_settings_check_the_flag():
    with pytest.raises(ValueError, match="backward_split must be a bool"):
        Settings(backward_split=1)
    assert Settings(backward_split=True).key != Settings().key   # a separate op call under torch.compile
