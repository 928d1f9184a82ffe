"""The chunked backward (docs/math.md, "The backward pass").

One program per (batch row, head, chunk of L tokens). Inputs: the chunk's start state S_0 (from the forward's
scan) and the gradient of its end state dS (from the backward scan). The chunk's n = L / C sub-blocks J each get
their own start state S_J and end-state gradient dE_J:

    dE_{n-1} = dS,   dE_{J-1} = diag(tot_J) dE_J + sum_{t in J} (r_t * pre_t) dy_t^T      (J = n-1 .. 1)
    S_0,             S_{J+1}  = diag(tot_J) S_J  + sum_{s in J} (k_s * suf_s) v_s^T       (J = 0 .. n-1)

(the program walks J = 0 .. n-1 carrying S, and recomputes dE_J from dS each time: holding more states spills)

and with them the gradients of one sub-block are those of a chunk of C tokens (pre, suf, tot inside J):

    dr_t = sum_{s<t} dA[t,s] k_s * W[t,s] + u * k_t dA[t,t] + pre_t * (S_J dy_t)
    dk_s = sum_{t>s} dA[t,s] r_t * W[t,s] + u * r_s dA[s,s] + suf_s * (dE_J v_s)
    dv_s = sum_{t>=s} A[t,s] dy_t + dE_J^T (k_s * suf_s)
    du   = sum_t r_t * k_t dA[t,t]                                  with dA[t,s] = dy_t . v_s

with the pairs' parts (sums over s < t with W[t, s] = prod_{s<m<t} d_m) from the binary tree of levels (levels.py).

dg_m (m in J) collects every term whose weight holds d_m (docs/math.md, "The backward pass", the exact form):

    dg_m = tot_J * rowsum(S_J * dE_J)              (the states: exp(tot) holds d_m)
         + sum_{t>m} r_t * pre_t * (S_J dy_t)       (state read by later rows: pre_t holds d_m)
         + sum_{s<m} k_s * suf_s * (dE_J v_s)       (state written by earlier rows: suf_s holds d_m)
         + the pairs s < m < t, level by level      (levels.pair_grads)

each a direct sum of exactly the terms that hold d_m (masked products), so nothing cancels and dw is as exact as
dr and dk. dw = dg * g (dg/dw = -exp(w) = g), and 0 where exp(g) is 0 in float32 (the clamp of rule 4
included), as for the true gradient.
"""
import triton
import triton.language as tl

from .common import chunk_start_state, g_rows, head_base, load_rows, mm, row_base, store_rows
from .levels import after, before, level_decays, masked_sum, pair_grads, split


@triton.jit
def dstate_back(r_ptr, dy_ptr, w_ptr, base, t0, T, stride_t, dE, N: tl.constexpr, C: tl.constexpr,
                LOG_C: tl.constexpr, SPREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """Gradient w.r.t. the state at the start of sub-block t0 .. t0+C-1, from dE at its end."""
    cols = tl.arange(0, N)
    idx = tl.arange(0, C)
    rows = t0 + idx
    g = g_rows(w_ptr, base, rows, idx >= 0, T, cols, stride_t)
    hi, mid, lo = split(g, PIECES)
    pre, _ = level_decays(hi, mid, lo, LOG_C, C, PIECES, MASK_PREC)
    rq = load_rows(r_ptr, base, rows, T, cols, stride_t) * pre
    dy = load_rows(dy_ptr, base, rows, T, cols, stride_t)
    return tl.exp(tl.sum(g, 0))[:, None] * dE + mm(tl.trans(rq), dy, SPREC)


@triton.jit
def block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base, t0, T,
                stride_t, S, dE, N: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                SPREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """All gradients of the sub-block t0 .. t0+C-1 given its start state S and end-state gradient dE.
    Returns the next start state and this sub-block's du."""
    idx = tl.arange(0, C)
    cols = tl.arange(0, N)
    rows = t0 + idx
    r = load_rows(r_ptr, base, rows, T, cols, stride_t)
    k = load_rows(k_ptr, base, rows, T, cols, stride_t)
    v = load_rows(v_ptr, base, rows, T, cols, stride_t)
    dy = load_rows(dy_ptr, base, rows, T, cols, stride_t)
    g = g_rows(w_ptr, base, rows, idx >= 0, T, cols, stride_t)              # 0 past T: decay 1
    hi, mid, lo = split(g, PIECES)
    A, DR, DK, DG = pair_grads(r, k, mm(dy, tl.trans(v), PREC), hi, mid, lo, C, LOG_C, PREC, PIECES, MASK_PREC)
    pre, suf = level_decays(hi, mid, lo, LOG_C, C, PIECES, MASK_PREC)
    dtot = tl.exp(tl.sum(g, 0))
    vdy = tl.sum(dy * v, 1)                                                # dA[t, t]
    bonus = u[None, :] * vdy[:, None]
    x_state = pre * mm(dy, tl.trans(S), SPREC)                             # pre_t * (S_J dy_t)
    kq = k * suf
    kap = mm(v, tl.trans(dE), SPREC)                                       # dE_J v_s
    store_rows(dr_ptr, base, rows, T, cols, stride_t, DR + bonus * k + x_state)
    store_rows(dk_ptr, base, rows, T, cols, stride_t, DK + bonus * r + suf * kap)
    dv = mm(tl.trans(A), dy, PREC) + tl.sum(r * u[None, :] * k, 1)[:, None] * dy + mm(kq, dE, SPREC)
    store_rows(dv_ptr, base, rows, T, cols, stride_t, dv)
    xh, xm, xl = split(r * x_state, PIECES)
    yh, ym, yl = split(kq * kap, PIECES)
    DG += masked_sum(after(C, LOG_C), xh, xm, xl, PIECES, MASK_PREC)        # sum over t > m
    DG += masked_sum(before(C, LOG_C), yh, ym, yl, PIECES, MASK_PREC)       # sum over s < m
    DG += (dtot * tl.sum(S * dE, 1))[None, :]
    store_rows(dw_ptr, base, rows, T, cols, stride_t, tl.where(tl.exp(g) > 0.0, DG * g, 0.0))
    du = tl.sum(r * k * vdy[:, None], 0)
    S = dtot[:, None] * S + mm(tl.trans(kq), v, SPREC)
    return S, du


@triton.jit
def backward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, dstates_ptr, dy_ptr,
                    dr_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr,
                    T, H, NC, stride_t, has_s0,
                    N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                    SPREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    pid = tl.program_id(0)
    c = pid % NC
    bh = pid // NC
    b = bh // H
    h = bh % H
    base = row_base(head_base(b, h, T, stride_t, N), c * L, stride_t)   # the chunk's first row
    T = T - c * L                                                          # rows from there on
    cols = tl.arange(0, N)
    u = tl.load(u_ptr + h * N + cols)
    t_c = 0
    S = chunk_start_state(s0_ptr, states_ptr, bh, c, NC, has_s0, cols, cols, N)
    du = tl.zeros([N], dtype=tl.float32)
    for J in range(L // C):
        # dE_J: back from the chunk's end dS (reloaded) through the later sub-blocks (recomputed, so that only
        # S and dE are held: more N x N states in registers spill)
        dE = tl.load(dstates_ptr + (bh.to(tl.int64) * NC + c) * N * N + cols[:, None] * N + cols[None, :])
        for jj in range(L // C - 1 - J):
            dE = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + (L // C - 1 - jj) * C, T, stride_t, dE,
                             N, C, LOG_C, SPREC, PIECES, MASK_PREC)
        S, du_J = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, u, base,
                              t_c + J * C, T, stride_t, S, dE, N, C, LOG_C, PREC, SPREC, PIECES, MASK_PREC)
        du += du_J
    # du partials: (B * NC, H, N), summed over the first axis by the caller
    tl.store(du_ptr + ((b.to(tl.int64) * NC + c) * H + h) * N + cols, du)


# Launch settings, by head size; the benchmark may override them (benchmarks/gpu_torch.py, VARIANTS=1).
TUNE = {}


def backward_config(N):
    """(num_warps, num_stages): the program holds two N x N float32 states (S and one dE)."""
    return TUNE.get(N, (4, 1) if N <= 64 else (16, 1))   # H200, training shape: 4 warps 7.35 ms, 8 warps 8.13


def launch_backward(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, precisions, L, C):
    """precisions: common.Precisions of the inputs' dtype."""
    B, T, H, N = r.shape
    NC = -(-T // L)
    warps, stages = backward_config(N)
    grid = (B * H * NC,)
    backward_kernel[grid](r, k, v, w, u, s0 if s0 is not None else u, states if states.numel() else u, dstates, dy,
                          dr, dk, dv, dw, du_part, T, H, NC, H * N, int(s0 is not None),
                          N=N, L=L, C=C, LOG_C=C.bit_length() - 1, **precisions.kernel_args(),
                          num_warps=warps, num_stages=stages)
