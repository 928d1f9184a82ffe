"""The masks of masks.py against their entry-by-entry definitions (tests/mask_definitions.py), for every level of a
sub-block, with the level given at run time as in the kernels' level loop. Compiled on a CUDA machine, under the
Triton interpreter on CPU tensors otherwise (TRITON_INTERPRET=1, as scripts/test.sh sets it)."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from rwkv6_keras_operator.engines.triton import masks
from tests import mask_definitions

pytestmark = pytest.mark.requires("triton")

CUDA = torch.cuda.is_available()
NAMES = ["before_mask", "after_mask", "pair_mask", "factor_mask", "span_mask"]


@triton.jit
def _masks_kernel(out_ptr, shift, C: tl.constexpr):
    i = tl.arange(0, C)
    offs = i[:, None] * C + i[None, :]
    tl.store(out_ptr + offs, masks.before_mask(C, shift).to(tl.int32))
    tl.store(out_ptr + C * C + offs, masks.after_mask(C, shift).to(tl.int32))
    tl.store(out_ptr + 2 * C * C + offs, masks.pair_mask(C, shift).to(tl.int32))
    tl.store(out_ptr + 3 * C * C + offs, masks.factor_mask(C, shift).to(tl.int32))
    tl.store(out_ptr + 4 * C * C + offs, masks.span_mask(C, shift).to(tl.int32))


@pytest.mark.parametrize("C", [16, 32, 64])
def test_masks_match_their_definitions(C):
    device = "cuda" if CUDA else "cpu"
    for shift in range(C.bit_length()):        # every level, and shift = log2(C): the whole sub-block
        out = torch.full((len(NAMES), C, C), -1, dtype=torch.int32, device=device)
        _masks_kernel[(1,)](out, shift, C=C)
        got = out.cpu().numpy()
        for n, name in enumerate(NAMES):
            want = mask_definitions.ALL[name](C, shift)
            bad = np.argwhere(got[n] != want)
            assert bad.size == 0, f"{name}, C={C}, shift={shift}: {len(bad)} entries differ, first [t, s] = {bad[0]}"
