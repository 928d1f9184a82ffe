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
with g cut into bfloat16 pieces (`exact_product`), each product exact, the sum float32. Masks are
[row, column] over the C rows of the sub-block.
"""
import triton
import triton.language as tl

from .common import exp, mm


@triton.jit
def exact_product(m, x, X_FIRST: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """m @ x (X_FIRST: x^T @ m) for a 0/1 matrix m, with x cut into PIECES bfloat16 pieces hi + mid + lo (24 bits
    of x with 3 pieces, 16 with 2, 8 with 1): every product is exact (0 or 1 times a bfloat16 value), so each entry is
    the float32 sum of exactly the selected terms, smallest piece first."""
    hi = x.to(tl.bfloat16).to(tl.float32)
    if PIECES == 1:
        out = piece_product(m, hi, X_FIRST, MASK_PREC)
    else:
        rest = x - hi
        mid = rest.to(tl.bfloat16).to(tl.float32)
        if PIECES == 3:
            low = piece_product(m, (rest - mid).to(tl.bfloat16).to(tl.float32), X_FIRST, MASK_PREC) + \
                piece_product(m, mid, X_FIRST, MASK_PREC)
        else:
            low = piece_product(m, mid, X_FIRST, MASK_PREC)
        out = low + piece_product(m, hi, X_FIRST, MASK_PREC)
    return out


@triton.jit
def piece_product(m, piece, X_FIRST: tl.constexpr, MASK_PREC: tl.constexpr):
    if X_FIRST:
        return mm(tl.trans(piece), m, MASK_PREC)
    else:
        return mm(m, piece, MASK_PREC)


@triton.jit
def masked_sum(mask, x, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """sum_m mask[t, m] x[m, :] for a 0/1 mask, exact in pieces (exact_product)."""
    if MASK_PREC == "bf16":
        m = tl.where(mask, 1.0, 0.0).to(tl.bfloat16)     # straight to the product's operand type
    else:
        m = mask.to(tl.float32)
    return exact_product(m, x, False, PIECES, MASK_PREC)


@triton.jit
def column_sums(x, R: tl.constexpr, BV: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """(columns of x, BV) tile whose row i holds sum_t x[t, i] (over the R rows of x) in every column: x^T times
    ones, exact in pieces (exact_product), so the result is in the layout of a product (no reduction across
    warps)."""
    return exact_product(tl.full([R, BV], 1.0, tl.float32), x, True, PIECES, MASK_PREC)


@triton.jit
def in_range(C: tl.constexpr, lo, hi, ROWS: tl.constexpr):
    """[C x C] mask: ROWS: row i holds the columns lo[i] <= j < hi[i]; else column j holds the rows lo[j] <= i < hi[j]
    (each compare is one instruction against a per-row / per-column bound)."""
    i = tl.arange(0, C)
    if ROWS:
        return (i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])
    else:
        return (i[:, None] >= lo[None, :]) & (i[:, None] < hi[None, :])


@triton.jit
def before(C: tl.constexpr, shift):
    """[t, m]: m comes before t inside t's block of 2^shift rows (shift = LOG_C: the whole sub-block)."""
    t = tl.arange(0, C)
    return in_range(C, (t >> shift) << shift, t, True)


@triton.jit
def after(C: tl.constexpr, shift):
    """[t, m]: m comes after t inside t's block of 2^shift rows."""
    t = tl.arange(0, C)
    return in_range(C, t + 1, ((t >> shift) + 1) << shift, True)


@triton.jit
def pairs(C: tl.constexpr, shift):
    """[t, s]: the pairs of level 2^shift: t in the lower, s in the upper half of one block of 2^(shift+1) rows."""
    t = tl.arange(0, C)
    lo = (t >> (shift + 1)) << (shift + 1)
    return in_range(C, lo, tl.where(((t >> shift) & 1) == 1, lo + (1 << shift), lo), True)


@triton.jit
def span_bounds(C: tl.constexpr, shift):
    """[lo_q, hi_q): the rows m whose d_m row q's level-2^shift factor holds: in q's own h-block, before q where q
    lies in a lower half (q is a later member t: pre_h) and after q where it lies in an upper half (an earlier
    member s: suf_h)."""
    q = tl.arange(0, C)
    blk = (q >> shift) << shift
    lower = ((q >> shift) & 1) == 1
    return tl.where(lower, blk, q + 1), tl.where(lower, q, blk + (1 << shift))


@triton.jit
def spanned(C: tl.constexpr, shift):
    """[q, m]: row q's level-2^shift factor holds d_m (the range of g summed into F_h)."""
    lo, hi = span_bounds(C, shift)
    return in_range(C, lo, hi, True)


@triton.jit
def spans(C: tl.constexpr, shift):
    """[m, q]: the level-2^shift term of row q holds d_m (the mask that gathers a level's part of dg)."""
    lo, hi = span_bounds(C, shift)
    return in_range(C, lo, hi, False)


@triton.jit
def level_factor(g, shift, C: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """F_h for h = 2^shift (C x N, every factor <= 1): exp(pre_h) on lower-half rows, exp(suf_h) on upper-half rows."""
    return exp(masked_sum(spanned(C, shift), g, PIECES, MASK_PREC))


@triton.jit
def exp_before(g, shift, C: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """exp(sum of g over the rows before t in t's block of 2^shift rows); shift = LOG_C: the sub-block's
    pre_t = prod_{m<t} d_m."""
    return exp(masked_sum(before(C, shift), g, PIECES, MASK_PREC))


@triton.jit
def exp_after(g, shift, C: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """exp(sum of g over the rows after s in s's block of 2^shift rows); shift = LOG_C: suf_s = prod_{m>s} d_m."""
    return exp(masked_sum(after(C, shift), g, PIECES, MASK_PREC))


@triton.jit
def pair_scores(r, k, g, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """A[t, s] = sum_i r_t[i] k_s[i] W[t, s, i] for s < t, 0 on and above the diagonal (C x C)."""
    A = tl.where(pairs(C, 0), mm(r, tl.trans(k), PREC), 0.0)
    for shift in tl.static_range(1, LOG_C):
        F = level_factor(g, shift, C, PIECES, MASK_PREC)
        A += tl.where(pairs(C, shift), mm(r * F, tl.trans(k * F), PREC), 0.0)
    return A


@triton.jit
def pair_grads(r, k, dA, g, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
               PIECES: tl.constexpr, DG_PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """The pairs' parts of the backward, level by level, with dA[t, s] = dy_t . v_s:

        A[t, s]            (for dv; as pair_scores)
        DR[t] = sum_{s<t} dA[t, s] k_s W[t, s],     DK[s] = sum_{t>s} dA[t, s] r_t W[t, s]
        DG[m] = sum over levels h of the level's terms r_t DR^h[t] (t > m) and k_s DK^h[s] (s < m) that span m

    Every pair's term enters DG only at the rows m it really spans (mask `spans`), so nothing cancels."""
    p = pairs(C, 0)
    dA_h = tl.where(p, dA, 0.0)
    A = tl.where(p, mm(r, tl.trans(k), PREC), 0.0)
    DR = mm(dA_h, k, PREC)                        # h = 1: W = 1, no row in between (nothing for DG)
    DK = mm(tl.trans(dA_h), r, PREC)
    DG = tl.zeros_like(r)
    for shift in range(1, LOG_C):
        p = pairs(C, shift)
        dA_h = tl.where(p, dA, 0.0)
        F = level_factor(g, shift, C, PIECES, MASK_PREC)    # pre_h on the rows t, suf_h on the rows s
        rq = r * F
        kq = k * F
        A += tl.where(p, mm(rq, tl.trans(kq), PREC), 0.0)
        part_r = mm(dA_h, kq, PREC) * F                      # non-zero on lower halves only (rows t)
        part_k = mm(tl.trans(dA_h), rq, PREC) * F            # on upper halves only (rows s)
        # r * part_r lives on the lower halves, k * part_k on the upper halves: one masked sum takes both
        DG += masked_sum(spans(C, shift), r * part_r + k * part_k, DG_PIECES, MASK_PREC)
        DR += part_r
        DK += part_k
    return A, DR, DK, DG
