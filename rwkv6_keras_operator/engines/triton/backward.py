"""The chunked backward (docs/math.md, "The backward pass").

One program per (batch row, head, chunk of L = 4 C tokens). Inputs: the chunk's start state S_0 (from the
forward's scan) and the gradient of its end state dS (from the backward scan). The chunk's four sub-blocks J
each get their own start state S_J and end-state gradient dE_J:

    dE_3 = dS,   dE_{J-1} = diag(tot_J) dE_J + sum_{t in J} (r_t * pre_t) dy_t^T      (first, J = 3 .. 1)
    S_0,         S_{J+1}  = diag(tot_J) S_J  + sum_{s in J} (k_s * suf_s) v_s^T       (then, J = 0 .. 3)

and with them the gradients of one sub-block are those of a chunk of C tokens (pre, suf, tot inside J):

    dr_t = sum_{s<t} dA[t,s] k_s * W[t,s] + u * k_t dA[t,t] + pre_t * (S_J dy_t)
    dk_s = sum_{t>s} dA[t,s] r_t * W[t,s] + u * r_s dA[s,s] + suf_s * (dE_J v_s)
    dv_s = sum_{t>=s} A[t,s] dy_t + dE_J^T (k_s * suf_s)
    du   = sum_t r_t * k_t dA[t,t]                                  with dA[t,s] = dy_t . v_s

The pair sums (W[t,s] = prod_{s<m<t} d_m) are built element by element, carrying decay products along the rows.

dg_m (m in J) is d_m times rowsum(S_before_m * dS_after_m); expanded over the sub-block, every term in it is

    dg_m = tot_J * rowsum(S_J * dE_J)              (the states: exp(tot) holds d_m)
         + sum_{t>m} r_t * pre_t * (S_J dy_t)       (state read by later rows: pre_t holds d_m)
         + sum_{s<m} k_s * suf_s * (dE_J v_s)       (state written by earlier rows: suf_s holds d_m)
         + sum_{t>m} X_t - sum_{s>=m} Y_s           (pairs s < m < t: the dg identity of docs/math.md)

with X_t = r_t * (pair part of dr_t), Y_s = k_s * (pair part of dk_s). Only the last line subtracts, and only
sums of pair terms computed element by element in float32 from the same dA, so a tiny decay d_m (whose true dg_m
is tiny) is not swamped by rounding of large cancelling state terms. dw = dg * g (dg/dw = -exp(w) = g), and 0
where exp(g) is 0 in float32 (the clamp of rule 4 included), as for the true gradient.
"""
import triton
import triton.language as tl

from .common import block_decays, chunk_start_state, g_rows, head_base, load_rows, load_vec, log_decay, store_rows


@triton.jit
def pairs_dr(r_ptr, k_ptr, w_ptr, dA, dAs, base, t0, T, stride_t, N: tl.constexpr, C: tl.constexpr,
             PREC: tl.constexpr, EXACT: tl.constexpr):
    """DR[t] = sum_{s<t} dA[t, s] k_s * prod_{s<m<t} d_m for the rows t of the sub-block: Q[s] = k_s * prod_{s<m<t}
    d_m is carried down the rows. With EXACT, also the pair part of dg as a direct sum,

        Z[m] = sum_{t>m} r_t * sum_{s<m} dA[t, s] k_s * prod_{s<m'<t} d_m'       (pairs s < m < t)

    row t adds r_t * (sum_{s<m} dA[t, s] Q[s]) to every m < t; the sum over s < m is a product with the 0/1
    matrix [s <= m < t] of Qs (Q shifted down one row) weighted by dAs[t, s] = dA[t, s - 1]."""
    idx = tl.arange(0, C)
    cols = tl.arange(0, N)
    Q = tl.zeros([C, N], dtype=tl.float32)
    Qs = tl.zeros([C, N], dtype=tl.float32)
    DR = tl.zeros([C, N], dtype=tl.float32)
    Z = tl.zeros([C, N], dtype=tl.float32)
    for tau in range(C):
        t = t0 + tau
        k_t = load_vec(k_ptr, base, t, T, cols, stride_t)
        d_t = tl.exp(tl.where(t < T, log_decay(load_vec(w_ptr, base, t, T, cols, stride_t)), 0.0))
        da = tl.sum(tl.where(idx[:, None] == tau, dA, 0.0), 0)           # dA[t, s] over s
        DR = tl.where(idx[:, None] == tau, tl.sum(da[:, None] * Q, 0)[None, :], DR)
        if EXACT:
            r_t = load_vec(r_ptr, base, t, T, cols, stride_t)
            das = tl.sum(tl.where(idx[:, None] == tau, dAs, 0.0), 0)
            M = tl.where((idx[None, :] <= idx[:, None]) & (idx[:, None] < tau), das[None, :], 0.0)   # [m, s]
            Z += r_t[None, :] * tl.dot(M, Qs, input_precision=PREC)
            Qs = tl.where(idx[:, None] == tau + 1, k_t[None, :], Qs * d_t[None, :])
        Q = tl.where(idx[:, None] == tau, k_t[None, :], Q * d_t[None, :])
    return DR, Z


@triton.jit
def pairs_dk(r_ptr, k_ptr, w_ptr, u, dA, base, t0, T, stride_t, N: tl.constexpr, C: tl.constexpr):
    """sum_{t>s} dA[t, s] r_t * prod_{s<m<t} d_m for the rows s of the sub-block (rows carried upwards), and
    A (C x C, the bonus on its diagonal) built column by column from the same products."""
    idx = tl.arange(0, C)
    cols = tl.arange(0, N)
    P = tl.zeros([C, N], dtype=tl.float32)
    DK = tl.zeros([C, N], dtype=tl.float32)
    A = tl.zeros([C, C], dtype=tl.float32)
    for step in range(C):
        sg = C - 1 - step
        s = t0 + sg
        r_s = load_vec(r_ptr, base, s, T, cols, stride_t)
        k_s = load_vec(k_ptr, base, s, T, cols, stride_t)
        d_s = tl.exp(tl.where(s < T, log_decay(load_vec(w_ptr, base, s, T, cols, stride_t)), 0.0))
        da = tl.sum(tl.where(idx[None, :] == sg, dA, 0.0), 1)            # dA[t, s] over t
        DK = tl.where(idx[:, None] == sg, tl.sum(da[:, None] * P, 0)[None, :], DK)
        a = tl.sum(P * k_s[None, :], 1)                                  # A[t, s], t > s
        a = tl.where(idx == sg, tl.sum(r_s * u * k_s, 0), a)
        A = tl.where(idx[None, :] == sg, a[:, None], A)
        P = tl.where(idx[:, None] == sg, r_s[None, :], P * d_s[None, :])
    return DK, A


@triton.jit
def dstate_back(r_ptr, dy_ptr, w_ptr, base, t0, T, stride_t, dE, N: tl.constexpr, C: tl.constexpr,
                PREC: tl.constexpr):
    """Gradient w.r.t. the state at the start of sub-block t0 .. t0+C-1, from dE at its end."""
    cols = tl.arange(0, N)
    rows = t0 + tl.arange(0, C)
    E, F, tot = block_decays(w_ptr, base, t0, T, cols, stride_t, C)
    rq = load_rows(r_ptr, base, rows, T, cols, stride_t) * tl.exp(E)
    dy = load_rows(dy_ptr, base, rows, T, cols, stride_t)
    return tl.exp(tot)[:, None] * dE + tl.dot(tl.trans(rq), dy, input_precision=PREC)


@triton.jit
def block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base, t0, T, stride_t,
                S, dE, N: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
                LAST: tl.constexpr):
    """All gradients of the sub-block t0 .. t0+C-1 given its start state S and end-state gradient dE.
    Returns the next start state (unless LAST) and this sub-block's du."""
    idx = tl.arange(0, C)
    cols = tl.arange(0, N)
    rows = t0 + idx
    r = load_rows(r_ptr, base, rows, T, cols, stride_t)
    k = load_rows(k_ptr, base, rows, T, cols, stride_t)
    v = load_rows(v_ptr, base, rows, T, cols, stride_t)
    dy = load_rows(dy_ptr, base, rows, T, cols, stride_t)
    g = g_rows(w_ptr, base, rows, idx >= 0, T, cols, stride_t)
    E, F, tot = block_decays(w_ptr, base, t0, T, cols, stride_t, C)
    pre = tl.exp(E)
    suf = tl.exp(F)
    dtot = tl.exp(tot)
    dA = tl.dot(dy, tl.trans(v), input_precision=PREC)                     # dA[t, s] = dy_t . v_s
    vdy = tl.sum(dy * v, 1)                                                # dA[t, t], exact
    sig = tl.dot(dy, tl.trans(S), input_precision=PREC)                    # S_J dy_t
    kap = tl.dot(v, tl.trans(dE), input_precision=PREC)                    # dE_J v_s
    if EXACT:
        vp = tl.where(idx[:, None] > 0, load_rows(v_ptr, base, rows - 1, T, cols, stride_t), 0.0)
        dAs = tl.dot(dy, tl.trans(vp), input_precision=PREC)              # dAs[t, s] = dy_t . v_{s-1}
    else:
        dAs = dA
    DRp, Z = pairs_dr(r_ptr, k_ptr, w_ptr, dA, dAs, base, t0, T, stride_t, N, C, PREC, EXACT)
    DKp, A = pairs_dk(r_ptr, k_ptr, w_ptr, u, dA, base, t0, T, stride_t, N, C)
    bonus = u[None, :] * vdy[:, None]
    store_rows(dr_ptr, base, rows, T, cols, stride_t, DRp + bonus * k + pre * sig)
    store_rows(dk_ptr, base, rows, T, cols, stride_t, DKp + bonus * r + suf * kap)
    kq = k * suf
    dv = tl.dot(tl.trans(A), dy, input_precision=PREC)
    dv = tl.dot(kq, dE, acc=dv, input_precision=PREC)
    store_rows(dv_ptr, base, rows, T, cols, stride_t, dv)
    # dg (see the module docstring)
    X_st = r * pre * sig
    Y_st = k * kap * suf
    if EXACT:
        after = (idx[None, :] > idx[:, None]).to(tl.float32)                  # [m, t] = t > m
        dg = (dtot * tl.sum(S * dE, 1))[None, :] + Z \
            + tl.dot(after, X_st, input_precision=PREC) \
            + tl.dot(tl.trans(after), Y_st, input_precision=PREC)
    else:
        X_all = r * DRp + X_st
        Y_p = k * DKp
        dg = (dtot * tl.sum(S * dE, 1))[None, :] \
            + (tl.cumsum(X_all, 0, reverse=True) - X_all) \
            + (tl.cumsum(Y_st, 0) - Y_st) \
            - tl.cumsum(Y_p, 0, reverse=True)
    store_rows(dw_ptr, base, rows, T, cols, stride_t, tl.where(tl.exp(g) > 0.0, dg * g, 0.0))
    du = tl.sum(r * k * vdy[:, None], 0)
    if not LAST:
        S = dtot[:, None] * S + tl.dot(tl.trans(kq), v, input_precision=PREC)
    return S, du


@triton.jit
def backward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, dstates_ptr, dy_ptr,
                    dr_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr,
                    T, H, NC, stride_t, has_s0,
                    N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
                    EXACT: tl.constexpr):
    tl.static_assert(L == 4 * C)
    pid = tl.program_id(0)
    c = pid % NC
    bh = pid // NC
    b = bh // H
    h = bh % H
    base = head_base(b, h, T, stride_t, N)
    cols = tl.arange(0, N)
    u = tl.load(u_ptr + h * N + cols)
    t_c = c * L
    soffs = cols[:, None] * N + cols[None, :]
    dE3 = tl.load(dstates_ptr + (bh.to(tl.int64) * NC + c) * N * N + soffs)
    dE2 = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + 3 * C, T, stride_t, dE3, N, C, PREC)
    dE1 = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + 2 * C, T, stride_t, dE2, N, C, PREC)
    dE0 = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + 1 * C, T, stride_t, dE1, N, C, PREC)
    S = chunk_start_state(s0_ptr, states_ptr, bh, c, NC, has_s0, cols, cols, N)
    S, du0 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base,
                         t_c, T, stride_t, S, dE0, N, C, PREC, EXACT, False)
    S, du1 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base,
                         t_c + C, T, stride_t, S, dE1, N, C, PREC, EXACT, False)
    S, du2 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base,
                         t_c + 2 * C, T, stride_t, S, dE2, N, C, PREC, EXACT, False)
    S, du3 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base,
                         t_c + 3 * C, T, stride_t, S, dE3, N, C, PREC, EXACT, True)
    # du partials: (B * NC, H, N), summed over the first axis by the caller
    tl.store(du_ptr + ((b.to(tl.int64) * NC + c) * H + h) * N + cols, du0 + du1 + du2 + du3)


def backward_warps(N):
    return 4 if N <= 32 else (8 if N <= 64 else 16)


def launch_backward(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, prec, L, C, exact=True):
    B, T, H, N = r.shape
    NC = -(-T // L)
    grid = (B * H * NC,)
    backward_kernel[grid](r, k, v, w, u, s0 if s0 is not None else u, states if states.numel() else u, dstates, dy,
                          dr, dk, dv, dw, du_part, T, H, NC, H * N, int(s0 is not None),
                          N=N, L=L, C=C, PREC=prec, EXACT=exact,
                          num_warps=backward_warps(N))
