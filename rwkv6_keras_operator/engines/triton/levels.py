"""The pairs inside one sub-block of C = 2^LOG_C rows, by the binary tree of levels on the tensor cores
(docs/math.md, "The binary tree inside a chunk").

At level h = 2^shift (shift = 0 .. LOG_C - 1) every block of 2h rows is an upper half U and a lower half D; each
pair (t in D, s in U) belongs to exactly one level and is split at the boundary between the halves:

    W[t, s] = prod_{s<m<t} d_m = exp(pre_h[t]) * exp(suf_h[s])
    pre_h[t] = sum of g over t's own h-block before t,      suf_h[s] = sum of g over s's own h-block after s

A row is a later member t at a level where it lies in a lower half and an earlier member s where it lies in an
upper half, never both: so one tile F_h holds exp(pre_h) on the lower and exp(suf_h) on the upper halves, and a
level's pairs are one masked product (r * F_h) (k * F_h)^T (at h = 1 the halves are neighbours and W = 1). Every
sum of g is a direct sum over exactly its range, so every exponent is <= 0 (rule 1): the product of a 0/1 mask
with g cut into bfloat16 pieces (masks.masked_sum), each product exact, the sum float32.

A level's 0/1 matrices (factor_mask for F_h, span_mask for dg) are built in every warp from their row bounds, or with
MASK_TABLE loaded from the level table (masks.level_table, Settings.mask_table): the same values either way.
"""
import triton
import triton.language as tl

from .common import exp, mm
from .masks import FACTOR, SPAN, after_mask, before_mask, exact_product, level_mask, masked_sum, pair_mask


@triton.jit
def level_factor(g, shift, levels_ptr, C: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr,
                 MASK_TABLE: tl.constexpr):
    """F_h for h = 2^shift (C x N, every factor <= 1): exp(pre_h) on lower-half rows, exp(suf_h) on upper-half rows."""
    return exp(exact_product(level_mask(levels_ptr, shift, FACTOR, C, MASK_PREC, MASK_TABLE), g, False, PIECES,
                             MASK_PREC))


@triton.jit
def level_span_sum(x, shift, levels_ptr, C: tl.constexpr, DG_PIECES: tl.constexpr, MASK_PREC: tl.constexpr,
                   MASK_TABLE: tl.constexpr):
    """dg's part of level 2^shift from its terms x (C x N): sum_q span_mask[m, q] x[q, :], exact in pieces."""
    return exact_product(level_mask(levels_ptr, shift, SPAN, C, MASK_PREC, MASK_TABLE), x, False, DG_PIECES, MASK_PREC)


@triton.jit
def pre_factor(g, shift, C: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """exp(sum of g over the rows before t in t's block of 2^shift rows); shift = LOG_C: the sub-block's
    pre_t = prod_{m<t} d_m."""
    return exp(masked_sum(before_mask(C, shift), g, PIECES, MASK_PREC))


@triton.jit
def suf_factor(g, shift, C: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """exp(sum of g over the rows after s in s's block of 2^shift rows); shift = LOG_C: suf_s = prod_{m>s} d_m."""
    return exp(masked_sum(after_mask(C, shift), g, PIECES, MASK_PREC))


@triton.jit
def pair_scores(r, k, g, levels_ptr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                PIECES: tl.constexpr, MASK_PREC: tl.constexpr, MASK_TABLE: tl.constexpr):
    """A[t, s] = sum_i r_t[i] k_s[i] W[t, s, i] for s < t, 0 on and above the diagonal (C x C)."""
    A = tl.where(pair_mask(C, 0), mm(r, tl.trans(k), PREC), 0.0)
    for shift in tl.static_range(1, LOG_C):
        F = level_factor(g, shift, levels_ptr, C, PIECES, MASK_PREC, MASK_TABLE)
        A += tl.where(pair_mask(C, shift), mm(r * F, tl.trans(k * F), PREC), 0.0)
    return A


@triton.jit
def pair_grads(r, k, dA, g, levels_ptr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
               PIECES: tl.constexpr, DG_PIECES: tl.constexpr, MASK_PREC: tl.constexpr, MASK_TABLE: tl.constexpr):
    """The pairs' parts of the backward, level by level, with dA[t, s] = dy_t . v_s:

        A[t, s]            (for dv; as pair_scores)
        dr[t] = sum_{s<t} dA[t, s] k_s W[t, s],     dk[s] = sum_{t>s} dA[t, s] r_t W[t, s]
        dg[m] = sum over levels h of the level's terms r_t dr^h[t] (t > m) and k_s dk^h[s] (s < m) that span m

    Every pair's term enters dg only at the rows m it really spans (masks.span_mask), so nothing cancels."""
    p = pair_mask(C, 0)
    dA_h = tl.where(p, dA, 0.0)
    A = tl.where(p, mm(r, tl.trans(k), PREC), 0.0)
    dr = mm(dA_h, k, PREC)                        # h = 1: W = 1, no row in between (nothing for dg)
    dk = mm(tl.trans(dA_h), r, PREC)
    dg = tl.zeros_like(r)
    for shift in range(1, LOG_C):
        p = pair_mask(C, shift)
        dA_h = tl.where(p, dA, 0.0)
        F = level_factor(g, shift, levels_ptr, C, PIECES, MASK_PREC, MASK_TABLE)   # pre_h on rows t, suf_h on rows s
        rq = r * F
        kq = k * F
        A += tl.where(p, mm(rq, tl.trans(kq), PREC), 0.0)
        part_r = mm(dA_h, kq, PREC) * F                      # non-zero on lower halves only (rows t)
        part_k = mm(tl.trans(dA_h), rq, PREC) * F            # on upper halves only (rows s)
        # r * part_r lives on the lower halves, k * part_k on the upper halves: one masked sum takes both
        dg += level_span_sum(r * part_r + k * part_k, shift, levels_ptr, C, DG_PIECES, MASK_PREC, MASK_TABLE)
        dr += part_r
        dk += part_k
    return A, dr, dk, dg
