"""The masks of masks.py against their entry-by-entry definitions (tests/mask_definitions.py), for every level of a
chunk, with the level a Python int (unrolled level loops) and a traced int32 (fori_loop)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv6_keras_operator.engines.pallas import masks
from tests import mask_definitions

pytestmark = pytest.mark.requires("pallas")

MASKS = {name: getattr(masks, name) for name in mask_definitions.ALL}


@pytest.mark.parametrize("L", [16, 32, 64])
@pytest.mark.parametrize("traced", [False, True])
def test_masks_match_their_definitions(L, traced):
    for name, mask in MASKS.items():
        fn = jax.jit(lambda s, mask=mask: mask(L, s)) if traced else (lambda s, mask=mask: mask(L, s))
        for shift in range(L.bit_length()):
            got = np.asarray(fn(jnp.int32(shift) if traced else shift))
            want = mask_definitions.ALL[name](L, shift)
            bad = np.argwhere(got != want)
            assert bad.size == 0, f"{name}, L={L}, shift={shift}: {len(bad)} entries differ, first {bad[0]}"
