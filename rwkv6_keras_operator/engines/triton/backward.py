"""The chunked backward (docs/math.md, "The backward pass").

One program per (batch row, head, chunk of L = 4 C tokens). Inputs: the chunk's start state S_0 (from the
forward's scan) and the gradient of its end state dS (from the backward scan). The chunk's four sub-blocks J
each get their own start state S_J and end-state gradient dE_J:

    dE_3 = dS,   dE_{J-1} = diag(tot_J) dE_J + sum_{t in J} (r_t * pre_t) dy_t^T      (J = 3 .. 1)
    S_0,         S_{J+1}  = diag(tot_J) S_J  + sum_{s in J} (k_s * suf_s) v_s^T       (J = 0 .. 3)

(the program walks J = 0 .. 3 carrying S, and recomputes dE_J from dS each time: holding all four spills)

and with them the gradients of one sub-block are those of a chunk of C tokens (pre, suf, tot inside J):

    dr_t = sum_{s<t} dA[t,s] k_s * W[t,s] + u * k_t dA[t,t] + pre_t * (S_J dy_t)
    dk_s = sum_{t>s} dA[t,s] r_t * W[t,s] + u * r_s dA[s,s] + suf_s * (dE_J v_s)
    dv_s = sum_{t>=s} A[t,s] dy_t + dE_J^T (k_s * suf_s)
    du   = sum_t r_t * k_t dA[t,t]                                  with dA[t,s] = dy_t . v_s

(pair sums with W[t,s] = prod_{s<m<t} d_m: bands.py, rows t for dr and rows s for dk and dv).

dg_m (m in J) is d_m times rowsum(S_before_m * dS_after_m); expanded over the sub-block, every term holds d_m:

    dg_m = tot_J * rowsum(S_J * dE_J)              (the states: exp(tot) holds d_m)
         + sum_{t>m} r_t * pre_t * (S_J dy_t)       (state read by later rows: pre_t holds d_m)
         + sum_{s<m} k_s * suf_s * (dE_J v_s)       (state written by earlier rows: suf_s holds d_m)
         + sum_{t>m} X_t - sum_{s>=m} Y_s           (pairs s < m < t: the dg identity of docs/math.md)

with X_t = r_t * (pair part of dr_t), Y_s = k_s * (pair part of dk_s). The first three lines are direct sums
(the exclusive sums as products with 0/1 matrices, so no term is added and then taken away again); only the
pair line subtracts, sums over one sub-block of float32 pair terms, so its rounding (~1e-7 of those sums, times
|g| in dw where a decay is tiny) stays far inside the float32 tolerance. dw = dg * g (dg/dw = -exp(w) = g), and 0
where exp(g) is 0 in float32 (the clamp of rule 4 included), as for the true gradient.
"""
import triton
import triton.language as tl

from .bands import band_grads_cols, band_grads_rows, store_decays
from .common import block_decays, chunk_start_state, head_base, load_rows, row_base, store_rows


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
def block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, d_ptr, u, base, t0, T,
                stride_t, S, dE, N: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """All gradients of the sub-block t0 .. t0+C-1 given its start state S and end-state gradient dE.
    Returns the next start state and this sub-block's du."""
    idx = tl.arange(0, C)
    cols = tl.arange(0, N)
    rows = t0 + idx
    r = load_rows(r_ptr, base, rows, T, cols, stride_t)
    k = load_rows(k_ptr, base, rows, T, cols, stride_t)
    v = load_rows(v_ptr, base, rows, T, cols, stride_t)
    dy = load_rows(dy_ptr, base, rows, T, cols, stride_t)
    g, d = store_decays(w_ptr, d_ptr, base, rows, T, cols, stride_t)
    tl.debug_barrier()                                                      # the scratch d is written
    DR, pre = band_grads_rows(dy, k_ptr, v_ptr, d_ptr, base, t0, T, stride_t, cols, C)
    DK, DV, suf = band_grads_cols(k, v, r_ptr, dy_ptr, d_ptr, base, t0, T, stride_t, cols, C)
    dtot = tl.exp(tl.sum(g, 0))
    vdy = tl.sum(dy * v, 1)                                                # dA[t, t]
    sig = tl.dot(dy, tl.trans(S), input_precision=PREC)                    # S_J dy_t
    kap = tl.dot(v, tl.trans(dE), input_precision=PREC)                    # dE_J v_s
    bonus = u[None, :] * vdy[:, None]
    store_rows(dr_ptr, base, rows, T, cols, stride_t, DR + bonus * k + pre * sig)
    store_rows(dk_ptr, base, rows, T, cols, stride_t, DK + bonus * r + suf * kap)
    kq = k * suf
    dv = DV + tl.sum(r * u[None, :] * k, 1)[:, None] * dy
    dv = tl.dot(kq, dE, acc=dv, input_precision=PREC)
    store_rows(dv_ptr, base, rows, T, cols, stride_t, dv)
    # dg (see the module docstring): exclusive sums over the sub-block as products with 0/1 matrices, in
    # 3xTF32 whatever the input dtype (the identity's pair sums must cancel to float32 accuracy)
    after = (idx[None, :] > idx[:, None]).to(tl.float32)                  # [m, t] = t > m
    before = (idx[None, :] < idx[:, None]).to(tl.float32)                 # [m, s] = s < m
    X = r * DR + r * pre * sig
    dg = (dtot * tl.sum(S * dE, 1))[None, :] \
        + tl.dot(after, X, input_precision="tf32x3") \
        + tl.dot(before, kq * kap, input_precision="tf32x3") \
        - tl.dot(1.0 - before, k * DK, input_precision="tf32x3")
    store_rows(dw_ptr, base, rows, T, cols, stride_t, tl.where(d > 0.0, dg * g, 0.0))
    du = tl.sum(r * k * vdy[:, None], 0)
    S = dtot[:, None] * S + tl.dot(tl.trans(kq), v, input_precision=PREC)
    return S, du


@triton.jit
def backward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, dstates_ptr, dy_ptr,
                    dr_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr, d_ptr,
                    T, H, NC, stride_t, has_s0,
                    N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    tl.static_assert(L == 4 * C)
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
            dE = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + (L // C - 1 - jj) * C, T, stride_t, dE, N, C, PREC)
        S, du_J = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dw_ptr, d_ptr, u, base,
                              t_c + J * C, T, stride_t, S, dE, N, C, PREC)
        du += du_J
    # du partials: (B * NC, H, N), summed over the first axis by the caller
    tl.store(du_ptr + ((b.to(tl.int64) * NC + c) * H + h) * N + cols, du)


# Launch settings, by head size; the benchmark may override them (benchmarks/gpu_torch.py, VARIANTS=1).
TUNE = {}


def backward_config(N):
    """(num_warps, num_stages): the program holds two N x N float32 states (S and one dE)."""
    return TUNE.get(N, (4, 1) if N <= 64 else (16, 1))   # H200, training shape: 4 warps 7.35 ms, 8 warps 8.13


def launch_backward(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, scratch, prec, L, C):
    """scratch: float32 like r (the decays, written and read by the kernel)."""
    B, T, H, N = r.shape
    NC = -(-T // L)
    warps, stages = backward_config(N)
    grid = (B * H * NC,)
    backward_kernel[grid](r, k, v, w, u, s0 if s0 is not None else u, states if states.numel() else u, dstates, dy,
                          dr, dk, dv, dw, du_part, scratch, T, H, NC, H * N, int(s0 is not None),
                          N=N, L=L, C=C, PREC=prec, num_warps=warps, num_stages=stages)
