"""The pairs inside one sub-block of C rows (docs/math.md, "Sub-blocks": the diagonal blocks, element by element),
one diagonal offset at a time.

For rows t > s of the sub-block the decay between them is W[t, s] = prod_{s<m<t} d_m (per key channel). Walk the
pairs by their offset delta = t - s = 1 .. C-1: with every tile indexed by its own row (C x N, one layout), the
pair (t, t - delta) needs the row t - delta of k and v, and

    D_1[t] = 1,          D_{delta+1}[t] = D_delta[t] * d_{t-delta}        (D_delta[t] = W[t, t - delta])

a direct product over exactly the range t - delta < m < t, one factor (<= 1) at a time. Rows outside the
sub-block load k = v = 0 and d = 1, so after the last offset D[t] = prod_{t0 <= m < t} d_m = pre_t (the chain's
by-product). The other direction (pairs (s + delta, s), rows indexed by s, d_{s+delta} multiplied in) ends on
suf_s = prod_{s<m<=t1} d_m.

The decays d are read from a float32 scratch written once per sub-block (`store_decays`), so the chains do no
transcendental work: each step is three shifted tile loads (cache hits), a row sum and a few products.
"""
import triton
import triton.language as tl

from .common import g_rows


@triton.jit
def load_shifted(ptr, base, rows, ok, T, cols, stride_t, other):
    """Tile of rows `rows` where ok, else `other`; float32. The rows are clamped into [0, T) and the load is
    unmasked (cheaper addressing): `ok` must exclude rows outside [0, T) whose values matter."""
    src = tl.minimum(tl.maximum(rows, 0), T - 1)
    x = tl.load((ptr + base) + (src[:, None] * stride_t + cols[None, :])).to(tl.float32)
    return tl.where(ok[:, None], x, other)


@triton.jit
def store_decays(w_ptr, d_ptr, base, rows, T, cols, stride_t):
    """g (0 past T) of the rows, and d = exp(g) written to the float32 scratch (the caller then syncs)."""
    g = g_rows(w_ptr, base, rows, rows >= 0, T, cols, stride_t)
    d = tl.exp(g)
    offs = rows[:, None] * stride_t + cols[None, :]
    tl.store((d_ptr + base) + offs, d, mask=(rows < T)[:, None])
    return g, d


@triton.jit
def band_rows(r_ptr, k_ptr, v_ptr, d_ptr, base, t0, T, stride_t, cols, jv, C: tl.constexpr):
    """Forward: sum_{s<t} A[t, s] v_s (C x BV) with A[t, s] = sum_i r_t k_s W[t, s], and pre (C x N)."""
    idx = tl.arange(0, C)
    rows = t0 + idx
    r = load_shifted(r_ptr, base, rows, rows < T, T, cols, stride_t, 0.0)
    D = tl.full(r.shape, 1.0, tl.float32)
    y = tl.zeros([C, jv.shape[0]], dtype=tl.float32)
    for delta in range(1, C):
        src = rows - delta
        ok = idx >= delta
        ks = load_shifted(k_ptr, base, src, ok, T, cols, stride_t, 0.0)
        vs = load_shifted(v_ptr, base, src, ok, T, jv, stride_t, 0.0)
        a = tl.sum(r * ks * D, 1)                                      # A[t, t - delta]
        y += a[:, None] * vs
        D = D * load_shifted(d_ptr, base, src, ok, T, cols, stride_t, 1.0)
    return y, D


@triton.jit
def band_grads_rows(dy, k_ptr, v_ptr, d_ptr, base, t0, T, stride_t, cols, C: tl.constexpr):
    """Backward, rows t: DR[t] = sum_{s<t} dA[t, s] k_s W[t, s] (dA[t, s] = dy_t . v_s), and pre."""
    idx = tl.arange(0, C)
    rows = t0 + idx
    D = tl.full(dy.shape, 1.0, tl.float32)
    DR = tl.zeros(dy.shape, dtype=tl.float32)
    for delta in range(1, C):
        src = rows - delta
        ok = idx >= delta
        ks = load_shifted(k_ptr, base, src, ok, T, cols, stride_t, 0.0)
        vs = load_shifted(v_ptr, base, src, ok, T, cols, stride_t, 0.0)
        da = tl.sum(dy * vs, 1)                                        # dA[t, t - delta]
        DR += da[:, None] * ks * D
        D = D * load_shifted(d_ptr, base, src, ok, T, cols, stride_t, 1.0)
    return DR, D


@triton.jit
def band_grads_cols(k, v, r_ptr, dy_ptr, d_ptr, base, t0, T, stride_t, cols, C: tl.constexpr):
    """Backward, rows s: DK[s] = sum_{t>s} dA[t, s] r_t W[t, s], DV[s] = sum_{t>s} A[t, s] dy_t, and suf."""
    idx = tl.arange(0, C)
    rows = t0 + idx
    D = tl.full(k.shape, 1.0, tl.float32)
    DK = tl.zeros(k.shape, dtype=tl.float32)
    DV = tl.zeros(v.shape, dtype=tl.float32)
    for delta in range(1, C):
        dst = rows + delta
        ok = (idx + delta < C) & (dst < T)
        rt = load_shifted(r_ptr, base, dst, ok, T, cols, stride_t, 0.0)
        dyt = load_shifted(dy_ptr, base, dst, ok, T, cols, stride_t, 0.0)
        da = tl.sum(dyt * v, 1)                                        # dA[s + delta, s]
        DK += da[:, None] * rt * D
        a = tl.sum(rt * k * D, 1)                                      # A[s + delta, s]
        DV += a[:, None] * dyt
        D = D * load_shifted(d_ptr, base, dst, ok, T, cols, stride_t, 1.0)
    return DK, DV, D
