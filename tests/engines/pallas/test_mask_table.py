"""The level table (Settings.mask_table: masks.level_table) of the Pallas engine: its entries against their
definitions, and the chunk kernels that read it (output and grads) against the float64 oracle: strong decays and
masks (w = -1e9 and +100), T not a multiple of the chunk, chunks of 16 and 32, float32 and bfloat16, head sizes up to
128, packed sequences. In the Pallas interpreter without a CUDA GPU; compiled on one.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv6_keras_operator.engines.pallas import masks
from rwkv6_keras_operator.engines.pallas.settings import Settings
from tests import mask_definitions
from tests.engines.pallas import test_varlen
from tests.engines.pallas.test_kernels import check, engine
from tests.engines.portable.test_varlen import PACKINGS

pytestmark = pytest.mark.requires("pallas")


@pytest.mark.parametrize("L", [16, 32, 64])
def test_table_holds_every_levels_masks(L):
    """Entry [shift - 1, FACTOR] is factor_mask and [shift - 1, SPAN] span_mask of level 2**shift, as 0/1 bfloat16."""
    table = masks.level_table(L)
    assert table.dtype == jnp.bfloat16 and table.shape == (L.bit_length() - 2, 2, L, L)
    got = np.asarray(table.astype(jnp.float32))
    for shift in range(1, L.bit_length() - 1):
        for kind, name in ((masks.FACTOR, "factor_mask"), (masks.SPAN, "span_mask")):
            want = mask_definitions.ALL[name](L, shift).astype(np.float32)
            bad = np.argwhere(got[shift - 1, kind] != want)
            assert bad.size == 0, f"{name}, L={L}, shift={shift}: {len(bad)} entries differ, first {bad[0]}"


@pytest.mark.parametrize("decay", ["strong", "masks"])
@pytest.mark.parametrize("chunk,T", [(16, 45), (32, 70)])
def test_matches_oracle(decay, chunk, T, seed):
    check(2, T, 2, 16, decay, seed=seed, fn=engine(chunk=chunk, mask_table=True))


def test_bfloat16(seed):
    check(1, 45, 2, 16, "masks", dtype="bfloat16", seed=seed, fn=engine(mask_table=True, low_precision="bf16"),
          low_precision="bf16")


def test_head_size_128(seed):
    check(1, 20, 1, 128, "strong", seed=seed, fn=engine(mask_table=True))


def test_packed_sequences(seed):
    for cu in PACKINGS[:2]:
        test_varlen.check(cu, settings=Settings(chunk=test_varlen.CHUNK, mask_table=True), seed=seed)


def test_the_kernels_read_the_table(monkeypatch):
    """The tests above would pass on built masks too: with the table's masks zeroed (every F_h = 1), the engine must
    miss the oracle."""
    monkeypatch.setattr(masks, "level_table", lambda L: jnp.zeros((L.bit_length() - 2, 2, L, L), jnp.bfloat16))
    with pytest.raises(AssertionError):
        check(1, 32, 1, 16, "strong", fn=engine(mask_table=True))


def test_settings_check_the_flag():
    with pytest.raises(ValueError, match="mask_table must be a bool"):
        Settings(mask_table=1)
