"""The pairs inside one sub-block of C rows (docs/math.md, "Sub-blocks": the diagonal blocks, element by element).

For rows t, s of the sub-block and key channels i, the decay between them is

    W[t, s, i] = prod_{s<m<t} d_m[i]          (s < t)

built for all pairs at once as a (C, C, IC) cube, IC key channels at a time: the cube holds d_{t-1} at [t, s]
where t - 1 > s and 1 elsewhere, and its cumulative product down the t axis is W: a direct product over exactly
the range s < m < t (factors <= 1, no exponent, no quotient). Everything is then an element-wise product and a
sum over one axis of the cube:

    A[t, s]  = sum_i r_t k_s W                     (s < t; the forward's and dv's pair matrix)
    DR[t, i] = sum_s dA[t, s] k_s W                (pair part of dr; dA[t, s] = dy_t . v_s)
    DK[s, i] = sum_t dA[t, s] r_t W                (pair part of dk)
    Z[m, i]  = sum_{s<m<t} dA[t, s] r_t k_s W      (pair part of dg_m: every term holds d_m)

Z as a direct sum: with Ws[t, s] = W[t, s - 1] = prod_{s<=m<t} d_m (the same cumulative product, one more factor)
the shifted terms q[t, s] = dA[t, s - 1] r_t k_{s-1} Ws[t, s] summed over s <= m give sum_{s<m} at every m without
a subtraction, and Z[m] sums those over t > m.
"""
import triton
import triton.language as tl

from .common import log_decay


@triton.jit
def _cube_loads(r_ptr, k_ptr, w_ptr, base, t0, T, stride_t, ic, C: tl.constexpr, IC: tl.constexpr):
    """r at [t, ., i] (C, 1, IC), k at [., s, i] (1, C, IC), d_{t-1} at [t, ., i] (1 where t - 1 is outside)."""
    tau = tl.arange(0, C)[:, None, None]
    sig = tl.arange(0, C)[None, :, None]
    cols = ic * IC + tl.arange(0, IC)[None, None, :]
    t = t0 + tau
    s = t0 + sig
    r3 = tl.load(r_ptr + base + t.to(tl.int64) * stride_t + cols, mask=(t < T) & (cols >= 0), other=0.0)
    k3 = tl.load(k_ptr + base + s.to(tl.int64) * stride_t + cols, mask=(s < T) & (cols >= 0), other=0.0)
    ok = (tau > 0) & (t - 1 < T) & (cols >= 0)
    wp = tl.load(w_ptr + base + (t - 1).to(tl.int64) * stride_t + cols, mask=ok, other=0.0)
    dp3 = tl.where(ok, tl.exp(log_decay(wp)), 1.0)
    return r3.to(tl.float32), k3.to(tl.float32), dp3


@triton.jit
def pair_matrix(r_ptr, k_ptr, w_ptr, base, t0, T, stride_t, N: tl.constexpr, C: tl.constexpr, IC: tl.constexpr):
    """A[t, s] = sum_i r_t k_s W[t, s] for s < t, 0 on and above the diagonal (C x C)."""
    tau = tl.arange(0, C)[:, None, None]
    sig = tl.arange(0, C)[None, :, None]
    A = tl.zeros([C, C], dtype=tl.float32)
    for ic in tl.static_range(N // IC):
        r3, k3, dp3 = _cube_loads(r_ptr, k_ptr, w_ptr, base, t0, T, stride_t, ic, C, IC)
        W = tl.cumprod(tl.where(tau > sig + 1, dp3, 1.0), 0)
        A += tl.sum(tl.where(tau > sig, r3 * k3 * W, 0.0), 2)
    return A


@triton.jit
def pair_grads(r_ptr, k_ptr, w_ptr, dA, dAs, base, t0, T, stride_t, ic, C: tl.constexpr, IC: tl.constexpr,
               EXACT: tl.constexpr):
    """For key channels ic*IC .. ic*IC+IC-1: DR (C, IC), DK (C, IC), A's part from these channels (C, C) and, with
    EXACT, Z (C, IC); dAs[t, s] = dA[t, s - 1] (0 at s = 0)."""
    tau = tl.arange(0, C)[:, None, None]
    sig = tl.arange(0, C)[None, :, None]
    r3, k3, dp3 = _cube_loads(r_ptr, k_ptr, w_ptr, base, t0, T, stride_t, ic, C, IC)
    W = tl.where(tau > sig, tl.cumprod(tl.where(tau > sig + 1, dp3, 1.0), 0), 0.0)
    dA3 = dA[:, :, None]
    KW = k3 * W
    DR = tl.sum(dA3 * KW, 1)
    A = tl.sum(r3 * KW, 2)
    DK = tl.sum(dA3 * r3 * W, 0)
    if EXACT:
        cols = ic * IC + tl.arange(0, IC)[None, None, :]
        s_prev = t0 + sig - 1
        kp3 = tl.load(k_ptr + base + s_prev.to(tl.int64) * stride_t + cols,
                      mask=(sig > 0) & (s_prev < T) & (cols >= 0), other=0.0).to(tl.float32)
        Ws = tl.cumprod(tl.where(tau > sig, dp3, 1.0), 0)
        q = tl.where(tau >= sig, dAs[:, :, None] * r3 * kp3 * Ws, 0.0)
        Z = tl.sum(tl.where(tau > sig, tl.cumsum(q, 1), 0.0), 0)
    else:
        Z = tl.zeros([C, IC], dtype=tl.float32)
    return DR, DK, A, Z
