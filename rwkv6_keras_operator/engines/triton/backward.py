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

(pair sums W[t,s] = prod_{s<m<t} d_m: pairs.py). Rows i of S_J, dE_J and the columns i of dr, dk, dw, du only
involve key channel i, so the program walks the key channels in tiles of IC (S_J and dE_J as IC x N tiles) and
adds up dv, which sums over i, across the tiles.

dg_m (m in J) is d_m times rowsum(S_before_m * dS_after_m); expanded over the sub-block, every term holds d_m:

    dg_m = tot_J * rowsum(S_J * dE_J)              (the states: exp(tot) holds d_m)
         + sum_{t>m} r_t * pre_t * (S_J dy_t)       (state read by later rows: pre_t holds d_m)
         + sum_{s<m} k_s * suf_s * (dE_J v_s)       (state written by earlier rows: suf_s holds d_m)
         + sum_{s<m<t} dA[t,s] r_t * k_s * W[t,s]   (pairs across m: W holds d_m)

all direct sums (no difference of large terms), so a tiny d_m gets a tiny dg_m, as it must. With EXACT=False
the last line comes from the dg identity of docs/math.md, sum_{t>m} X_t - sum_{s>=m} Y_s (X_t = r_t * pair part
of dr_t, Y_s = k_s * pair part of dk_s): cheaper, but its rounding (~1e-7 of the pair sums) is multiplied by |g|
in dw where a decay is tiny. dw = dg * g (dg/dw = -exp(w) = g), and 0 where exp(g) is 0 in float32 (the clamp of
rule 4 included), as for the true gradient.
"""
import triton
import triton.language as tl

from .common import block_decays, chunk_start_state, g_rows, head_base, load_rows, store_rows
from .pairs import pair_grads


@triton.jit
def dstate_back(r_ptr, dy_ptr, w_ptr, base, t0, T, stride_t, dE, ik, N: tl.constexpr, C: tl.constexpr,
                PREC: tl.constexpr):
    """Gradient w.r.t. the state at the start of sub-block t0 .. t0+C-1 (key rows ik), from dE at its end."""
    rows = t0 + tl.arange(0, C)
    E, F, tot = block_decays(w_ptr, base, t0, T, ik, stride_t, C)
    rq = load_rows(r_ptr, base, rows, T, ik, stride_t) * tl.exp(E)
    dy = load_rows(dy_ptr, base, rows, T, tl.arange(0, N), stride_t)
    return tl.exp(tot)[:, None] * dE + tl.dot(tl.trans(rq), dy, input_precision=PREC)


@triton.jit
def block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dw_ptr, u_ptr, h, base, t0, T, stride_t,
                S, dE, ic, N: tl.constexpr, C: tl.constexpr, IC: tl.constexpr, PREC: tl.constexpr,
                EXACT: tl.constexpr):
    """Gradients of the sub-block t0 .. t0+C-1 for key channels ik = ic*IC .. ic*IC+IC-1, given its start state
    S and end-state gradient dE (rows ik, IC x N). Stores dr, dk, dw there; returns the next S (rows ik), this
    tile's part of dv (C x N) and of du (IC)."""
    idx = tl.arange(0, C)
    ik = ic * IC + tl.arange(0, IC)
    jv = tl.arange(0, N)
    rows = t0 + idx
    r = load_rows(r_ptr, base, rows, T, ik, stride_t)
    k = load_rows(k_ptr, base, rows, T, ik, stride_t)
    v = load_rows(v_ptr, base, rows, T, jv, stride_t)
    dy = load_rows(dy_ptr, base, rows, T, jv, stride_t)
    u = tl.load(u_ptr + h * N + ik)
    g = g_rows(w_ptr, base, rows, idx >= 0, T, ik, stride_t)
    E, F, tot = block_decays(w_ptr, base, t0, T, ik, stride_t, C)
    pre = tl.exp(E)
    suf = tl.exp(F)
    dtot = tl.exp(tot)
    dA = tl.dot(dy, tl.trans(v), input_precision=PREC)                     # dA[t, s] = dy_t . v_s
    if EXACT:
        vp = tl.where(idx[:, None] > 0, load_rows(v_ptr, base, rows - 1, T, jv, stride_t), 0.0)
        dAs = tl.dot(dy, tl.trans(vp), input_precision=PREC)              # dA[t, s - 1]
    else:
        dAs = dA
    vdy = tl.sum(dy * v, 1)                                                # dA[t, t], exact
    sig = tl.dot(dy, tl.trans(S), input_precision=PREC)                    # (S_J dy_t)[ik]
    kap = tl.dot(v, tl.trans(dE), input_precision=PREC)                    # (dE_J v_s)[ik]
    DR, DK, A, Z = pair_grads(r_ptr, k_ptr, w_ptr, dA, dAs, base, t0, T, stride_t, ic, C, IC, EXACT)
    bonus = u[None, :] * vdy[:, None]
    store_rows(dr_ptr, base, rows, T, ik, stride_t, DR + bonus * k + pre * sig)
    store_rows(dk_ptr, base, rows, T, ik, stride_t, DK + bonus * r + suf * kap)
    kq = k * suf
    A = tl.where(idx[:, None] == idx[None, :], tl.sum(r * u[None, :] * k, 1)[:, None], A)   # the bonus
    dv = tl.dot(tl.trans(A), dy, input_precision=PREC)
    dv = tl.dot(kq, dE, acc=dv, input_precision=PREC)
    # dg (see the module docstring)
    X_st = r * pre * sig
    Y_st = kq * kap
    states = (dtot * tl.sum(S * dE, 1))[None, :]
    if EXACT:
        after = (idx[None, :] > idx[:, None]).to(tl.float32)              # [m, t] = t > m
        dg = states + Z + tl.dot(after, X_st, input_precision=PREC) \
            + tl.dot(tl.trans(after), Y_st, input_precision=PREC)
    else:
        X_all = r * DR + X_st
        Y_p = k * DK
        dg = states + (tl.cumsum(X_all, 0, reverse=True) - X_all) + (tl.cumsum(Y_st, 0) - Y_st) \
            - tl.cumsum(Y_p, 0, reverse=True)
    store_rows(dw_ptr, base, rows, T, ik, stride_t, tl.where(tl.exp(g) > 0.0, dg * g, 0.0))
    du = tl.sum(r * k * vdy[:, None], 0)
    S = dtot[:, None] * S + tl.dot(tl.trans(kq), v, input_precision=PREC)
    return S, dv, du


@triton.jit
def backward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, dstates_ptr, dy_ptr,
                    dr_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr,
                    T, H, NC, stride_t, has_s0,
                    N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, IC: tl.constexpr, PREC: tl.constexpr,
                    EXACT: tl.constexpr):
    tl.static_assert(L == 4 * C)
    pid = tl.program_id(0)
    c = pid % NC
    bh = pid // NC
    b = bh // H
    h = bh % H
    base = head_base(b, h, T, stride_t, N)
    jv = tl.arange(0, N)
    t_c = c * L
    dv0 = tl.zeros([C, N], dtype=tl.float32)
    dv1 = tl.zeros([C, N], dtype=tl.float32)
    dv2 = tl.zeros([C, N], dtype=tl.float32)
    dv3 = tl.zeros([C, N], dtype=tl.float32)
    for ic in range(N // IC):
        ik = ic * IC + tl.arange(0, IC)
        dE3 = tl.load(dstates_ptr + (bh.to(tl.int64) * NC + c) * N * N + ik[:, None] * N + jv[None, :])
        dE2 = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + 3 * C, T, stride_t, dE3, ik, N, C, PREC)
        dE1 = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + 2 * C, T, stride_t, dE2, ik, N, C, PREC)
        dE0 = dstate_back(r_ptr, dy_ptr, w_ptr, base, t_c + 1 * C, T, stride_t, dE1, ik, N, C, PREC)
        S = chunk_start_state(s0_ptr, states_ptr, bh, c, NC, has_s0, ik, jv, N)
        S, dv, du0 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dw_ptr, u_ptr, h, base,
                                 t_c, T, stride_t, S, dE0, ic, N, C, IC, PREC, EXACT)
        dv0 += dv
        S, dv, du1 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dw_ptr, u_ptr, h, base,
                                 t_c + C, T, stride_t, S, dE1, ic, N, C, IC, PREC, EXACT)
        dv1 += dv
        S, dv, du2 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dw_ptr, u_ptr, h, base,
                                 t_c + 2 * C, T, stride_t, S, dE2, ic, N, C, IC, PREC, EXACT)
        dv2 += dv
        S, dv, du3 = block_grads(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, dr_ptr, dk_ptr, dw_ptr, u_ptr, h, base,
                                 t_c + 3 * C, T, stride_t, S, dE3, ic, N, C, IC, PREC, EXACT)
        dv3 += dv
        # du partials: (B * NC, H, N), summed over the first axis by the caller
        tl.store(du_ptr + ((b.to(tl.int64) * NC + c) * H + h) * N + ik, du0 + du1 + du2 + du3)
    rows = t_c + tl.arange(0, C)
    store_rows(dv_ptr, base, rows, T, jv, stride_t, dv0)
    store_rows(dv_ptr, base, rows + C, T, jv, stride_t, dv1)
    store_rows(dv_ptr, base, rows + 2 * C, T, jv, stride_t, dv2)
    store_rows(dv_ptr, base, rows + 3 * C, T, jv, stride_t, dv3)


# Launch settings, by head size; the benchmark may override them (benchmarks/gpu_torch.py, VARIANTS=1).
TUNE = {}


def backward_config(N):
    """(IC, num_warps, num_stages)."""
    return TUNE.get(N, (16, 8, 2) if N <= 64 else (16, 8, 1))


def launch_backward(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, prec, L, C, exact=True):
    B, T, H, N = r.shape
    NC = -(-T // L)
    IC, warps, stages = backward_config(N)
    grid = (B * H * NC,)
    backward_kernel[grid](r, k, v, w, u, s0 if s0 is not None else u, states if states.numel() else u, dstates, dy,
                          dr, dk, dv, dw, du_part, T, H, NC, H * N, int(s0 is not None),
                          N=N, L=L, C=C, IC=IC, PREC=prec, EXACT=exact, num_warps=warps, num_stages=stages)
