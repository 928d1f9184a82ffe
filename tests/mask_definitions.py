"""The masks of the binary tree inside a block of positions (docs/math.md, "The binary tree inside a chunk"), written
out entry by entry in NumPy: the definitions the GPU engines' mask formulas are tested against."""
import numpy as np


def grid(L):
    i = np.arange(L)
    return i[:, None], i[None, :]


def before_mask(L, shift):
    """[t, m]: m before t inside t's block of 2^shift positions."""
    t, m = grid(L)
    return (m < t) & ((t >> shift) == (m >> shift))


def after_mask(L, shift):
    """[t, m]: m after t inside t's block of 2^shift positions."""
    t, m = grid(L)
    return (m > t) & ((t >> shift) == (m >> shift))


def pair_mask(L, shift):
    """[t, s]: t in the lower, s in the upper half of one block of 2^(shift+1) positions."""
    t, s = grid(L)
    return ((t >> (shift + 1)) == (s >> (shift + 1))) & ((t >> shift) != (s >> shift)) & (t > s)


def factor_mask(L, shift):
    """[q, m]: q's level-2^shift factor holds d_m: m in q's h-block, before q in a lower half, after q in an upper."""
    q, m = grid(L)
    lower = ((q >> shift) & 1) == 1
    return ((m >> shift) == (q >> shift)) & np.where(lower, m < q, m > q)


def span_mask(L, shift):
    """[m, q]: factor_mask transposed (q's term of level 2^shift spans m)."""
    return factor_mask(L, shift).T


ALL = {mask.__name__: mask for mask in (before_mask, after_mask, pair_mask, factor_mask, span_mask)}
