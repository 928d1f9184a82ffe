"""Masks over the positions of one chunk of L = 2^K tokens (t, s, m in [0, L)), and the exact masked sums over them
(docs/math.md, "The binary tree inside a chunk"). Every mask is [row, column]; `shift` may be a Python int (unrolled
level loops) or a traced int32 (fori_loop). The mask formulas are tested entry by entry against
tests/mask_definitions.py.
"""
import jax.numpy as jnp

from . import common
from .common import BF16, F32


def log2(L):
    k = L.bit_length() - 1
    assert L == 1 << k, L
    return k


def in_range(L, lo, hi, rows=True):
    """[L x L] mask: (rows) row i holds the columns lo[i] <= j < hi[i]; (not rows) column j holds the rows
    lo[j] <= i < hi[j]. Each entry is two compares against a bound of its row or column (as cheap as a mask gets
    in the layout of a product's operand, where every warp holds the whole tile)."""
    i = jnp.arange(L, dtype=jnp.int32)
    if rows:
        return (i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])
    return (i[:, None] >= lo[None, :]) & (i[:, None] < hi[None, :])


def before_mask(L, shift):
    """[t, m]: m lies before t inside t's block of h = 2**shift positions (shift may be traced)."""
    t = jnp.arange(L, dtype=jnp.int32)
    return in_range(L, (t >> shift) << shift, t)


def after_mask(L, shift):
    """[s, m]: m lies after s inside s's block of h = 2**shift positions."""
    s = jnp.arange(L, dtype=jnp.int32)
    return in_range(L, s + 1, ((s >> shift) + 1) << shift)


def pair_mask(L, shift):
    """[t, s]: the pairs split at level h = 2**shift: t in the lower, s in the upper half of a 2h-block (rows t of
    upper halves hold none)."""
    t = jnp.arange(L, dtype=jnp.int32)
    lo = (t >> (shift + 1)) << (shift + 1)
    return in_range(L, lo, jnp.where(((t >> shift) & 1) == 1, lo + (1 << shift), lo))


def span_bounds(L, shift):
    """[lo_q, hi_q): the positions m whose d_m position q's level-2**shift factor holds: m in q's own h-block, before
    q where q lies in a lower half (q is a later member t of a pair: pre_h) and after q where it lies in an upper half
    (an earlier member s: suf_h)."""
    q = jnp.arange(L, dtype=jnp.int32)
    blk = (q >> shift) << shift
    lower = ((q >> shift) & 1) == 1
    return jnp.where(lower, blk, q + 1), jnp.where(lower, q, blk + (1 << shift))


def factor_mask(L, shift):
    """[q, m]: the range of g summed into q's level-2**shift factor (levels.ChunkKeys.level_factor)."""
    return in_range(L, *span_bounds(L, shift))


def span_mask(L, shift):
    """[m, q]: factor_mask transposed. For the pairs of level h = 2**shift, q is a position whose term spans m: q after
    m in a lower half (q is the later member t of a pair), or q before m in an upper half (q is the earlier s)."""
    return in_range(L, *span_bounds(L, shift), rows=False)


# The level table (Settings.mask_table): factor_mask and span_mask of every level h = 2**shift, shift = 1 .. K - 1, as
# bfloat16 0/1 matrices (K - 1, 2, L, L), built by level_table from the functions above outside the kernels (a
# constant of the traced program) and passed to the chunk kernels, which then load a level's masks instead of building
# them from their row bounds in every warp.
FACTOR, SPAN = 0, 1


def level_table(L):
    return jnp.stack([jnp.stack([factor_mask(L, shift), span_mask(L, shift)]) for shift in range(1, log2(L))]
                     ).astype(BF16)


def level_table_for(settings, L):
    """The level table the chunk kernels read with settings.mask_table (settings.Settings), else None."""
    return level_table(L) if settings.mask_table else None


def level_mask(L, shift, kind, levels_ref):
    """The 0/1 matrix of level 2**shift's factor_mask (kind FACTOR) or span_mask (kind SPAN): loaded from the level
    table (levels_ref, a ref to level_table(L)) or, with None, built here."""
    if levels_ref is not None:
        return levels_ref[shift - 1, kind]
    return (factor_mask if kind == FACTOR else span_mask)(L, shift)


def bf16_pieces(x, pieces):
    """bfloat16 tiles whose sum is the float32 tile x: 3 pieces carry all 24 bits (exact), 2 carry 16, 1 carries 8
    (shared.Precisions.pieces and dg_pieces)."""
    hi = x.astype(BF16)
    if pieces == 1:
        return (hi,)
    rest = x - hi.astype(F32)
    mid = rest.astype(BF16)
    if pieces == 2:
        return hi, mid
    return hi, mid, (rest - mid.astype(F32)).astype(BF16)


def masked_sum(mask, parts, prec):
    """sum_m mask[t, m] * x[m, :] for a 0/1 mask, x given by bf16_pieces(x, ...), the products at `prec`
    (shared.Precisions.mask_prec).

    Each product is exact (0 or 1 times a bfloat16 value) and accumulates in float32, so the result is a
    direct sum of exactly the selected terms: for a mask over a contiguous range of g <= 0 that is the sum
    of rule 1 (no difference of running sums, no cancellation).
    """
    m = mask.astype(BF16)
    out = None
    for part in reversed(parts):   # smallest first
        term = common.mm(m, part, prec)
        out = term if out is None else out + term
    return out
