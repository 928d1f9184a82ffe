"""The pairs inside one sub-block of C = 16 rows on the tensor cores (docs/math.md, "The binary tree inside a
chunk", applied to a sub-block).

At level h = 1, 2, 4, 8 every block of 2h rows is an upper half U and a lower half D; each pair (t in D, s in U)
belongs to exactly one level, and is split at the boundary between the halves:

    W[t, s] = P_h[t] * Q_h[s],   P_h[t] = prod_{m in D, m < t} d_m,   Q_h[s] = prod_{m in U, m > s} d_m

both direct products over a contiguous range (<= 1). The four levels are stacked along the rows of 4C-row tiles
(row p = C * level + t), so each step is one matrix product:

    E = Mp @ g, F = Ms @ g      (0/1 matrices selecting each row's range: direct sums of g, <= 0)
    A_all = (r * exp(E)) @ (k * exp(F))^T, kept on each level's own pairs, and the levels added up.
"""
import triton
import triton.language as tl


@triton.jit
def level_rows(C: tl.constexpr):
    """For the 4C stacked rows: (level l, with h = 2^l; row t within the sub-block)."""
    p = tl.arange(0, 4 * C)
    return p // C, p % C


@triton.jit
def stacked_factors(g, C: tl.constexpr, EXP_PREC: tl.constexpr):
    """exp(E), exp(F) (4C x N): row (level h, t) holds prod of d over t's own h-block before / after t."""
    lv, t = level_rows(C)
    m = tl.arange(0, C)[None, :]
    same = (m >> lv[:, None]) == (t >> lv)[:, None]
    Mp = (same & (m < t[:, None])).to(tl.float32)
    Ms = (same & (m > t[:, None])).to(tl.float32)
    return tl.exp(tl.dot(Mp, g, input_precision=EXP_PREC)), tl.exp(tl.dot(Ms, g, input_precision=EXP_PREC))


@triton.jit
def pair_mask(C: tl.constexpr):
    """(4C x 4C): stacked row p, column q are a pair (t in D, s in U) of the same level (block-diagonal)."""
    lv, t = level_rows(C)
    lq, s = level_rows(C)
    l1 = lv[:, None] + 1
    return (lv[:, None] == lq[None, :]) & ((t[:, None] >> l1) == (s[None, :] >> l1)) \
        & (((t[:, None] >> lv[:, None]) & 1) == 1) & (((s[None, :] >> lv[:, None]) & 1) == 0)


@triton.jit
def fold(C: tl.constexpr):
    """(C x 4C) 0/1: sums the four levels' rows."""
    return (tl.arange(0, C)[:, None] == (tl.arange(0, 4 * C) % C)[None, :]).to(tl.float32)


@triton.jit
def stacked_rows(ptr, base, t0, T, cols, stride_t, C: tl.constexpr):
    """Rows t0 + t of the sub-block, stacked four times (4C x len(cols)), float32, 0 past T."""
    rows = t0 + tl.arange(0, 4 * C) % C
    offs = rows[:, None] * stride_t + cols[None, :]
    return tl.load((ptr + base) + offs, mask=(rows < T)[:, None], other=0.0).to(tl.float32)


@triton.jit
def pair_matrix(r_ptr, k_ptr, g, base, t0, T, stride_t, cols, C: tl.constexpr, PREC: tl.constexpr,
                EXP_PREC: tl.constexpr):
    """A[t, s] = sum_i r_t k_s W[t, s] for s < t in the sub-block (C x C), 0 on and above the diagonal."""
    P, Q = stacked_factors(g, C, EXP_PREC)
    RP = stacked_rows(r_ptr, base, t0, T, cols, stride_t, C) * P
    KQ = stacked_rows(k_ptr, base, t0, T, cols, stride_t, C) * Q
    A_all = tl.where(pair_mask(C), tl.dot(RP, tl.trans(KQ), input_precision=PREC), 0.0)
    Fo = fold(C)
    return tl.dot(tl.dot(Fo, A_all, input_precision=PREC), tl.trans(Fo), input_precision=PREC)
