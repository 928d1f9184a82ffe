"""The backward chunk kernel: every gradient inside a chunk (docs/math.md, "The backward pass").

One program per (batch row, head, sub-block J of C rows of a chunk of L tokens). Inputs: the state at the chunk's
start (from the forward's scan) and the gradient of the state at its end dS (from the backward scan). The program
moves them to its own sub-block, S_J at its start and dS_J at its end (L / C - 1 sub-blocks at most, each way):

    S_{J+1} = diag(tot_J) S_J + sum_{s in J} (k_s * suf_s) v_s^T            (sub_blocks.sub_block_start)
    dS_{J-1} = diag(tot_J) dS_J + sum_{t in J} (r_t * pre_t) dy_t^T          (dS_{n-1}: the chunk's dS)

and with them the gradients of one sub-block are those of a chunk of C tokens (pre, suf, tot inside J):

    dr_t = sum_{s<t} dA[t,s] k_s * W[t,s] + u * k_t dA[t,t] + pre_t * (S_J dy_t)
    dk_s = sum_{t>s} dA[t,s] r_t * W[t,s] + u * r_s dA[s,s] + suf_s * (dS_J v_s)
    dv_s = sum_{t>=s} A[t,s] dy_t + dS_J^T (k_s * suf_s)
    du   = sum_t r_t * k_t dA[t,t]                                  with dA[t,s] = dy_t . v_s

with the pairs' parts (sums over s < t with W[t, s] = prod_{s<m<t} d_m) from the binary tree of levels (levels.py).

dg_m (m in J) collects every term whose weight holds d_m (docs/math.md, "The backward pass", the exact form):

    dg_m = tot_J * rowsum(S_J * dS_J)              (the states: exp(tot) holds d_m)
         + sum_{t>m} r_t * pre_t * (S_J dy_t)       (state read by later rows: pre_t holds d_m)
         + sum_{s<m} k_s * suf_s * (dS_J v_s)       (state written by earlier rows: suf_s holds d_m)
         + the pairs s < m < t, level by level      (levels.pair_grads)

each a direct sum of exactly the terms that hold d_m (masked products), so nothing cancels and dw is as exact as
dr and dk. dw = dg * g (dg/dw = -exp(w) = g), and 0 where exp(g) is 0 in float32 (the clamp of rule 4
included), as for the true gradient.
"""
import triton
import triton.language as tl

from .common import (G_ZERO, chunk_rows, exp, g_rows, launch_chunks, load_rows, load_rows_cached, mm,
                     precision_args, store_rows)
from .levels import pair_grads, pre_factor, suf_factor
from .masks import after_mask, before_mask, level_table_for, masked_sum
from .backward_split import launch_backward_split, launch_options, sub_block_end_grad
from .sub_blocks import sub_block, sub_block_start


@triton.jit
def backward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, dstates_ptr, dy_ptr,
                    dr_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr, chunks_ptr, levels_ptr,
                    T, H, NC, stride_t,
                    N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                    STATE_PREC: tl.constexpr, PIECES: tl.constexpr, DG_PIECES: tl.constexpr, MASK_PREC: tl.constexpr,
                    HAS_S0: tl.constexpr, HAS_STATES: tl.constexpr, VARLEN: tl.constexpr, MASK_TABLE: tl.constexpr):
    tl.static_assert(C == 1 << LOG_C, "the sub-block C must be 2^LOG_C rows")
    tl.static_assert(L % C == 0, "a chunk of L rows must be whole sub-blocks of C rows")
    pid = tl.program_id(0)
    bh, c, J = sub_block(pid, NC, L, C)
    b = bh // H
    h = bh % H
    base, T = chunk_rows(chunks_ptr, b, h, c, T, stride_t, N, L, VARLEN)   # the chunk's first row, rows from there on
    if VARLEN:
        if T <= 0:   # a chunk past the packed sequences' last one: no rows (and no state stored for it)
            return
    kcols = tl.arange(0, N)
    vcols = kcols                                                          # all value channels
    idx = tl.arange(0, C)
    rows = J * C + idx
    r = load_rows(r_ptr, base, rows, T, kcols, stride_t)
    k = load_rows(k_ptr, base, rows, T, kcols, stride_t)
    g = g_rows(w_ptr, base, rows, idx >= 0, T, kcols, stride_t)          # 0 past T: decay 1
    v = load_rows(v_ptr, base, rows, T, vcols, stride_t)
    dy = load_rows(dy_ptr, base, rows, T, vcols, stride_t)
    dA_diag = tl.sum(dy * v, 1)                                            # dA[t, t]
    A, dr, dk, dg = pair_grads(r, k, mm(dy, tl.trans(v), PREC), g, levels_ptr, C, LOG_C, PREC, PIECES, DG_PIECES,
                               MASK_PREC, MASK_TABLE)
    # v and dy again, from L2 (a load of its own): not held in registers through the levels
    v = load_rows_cached(v_ptr, base, rows, T, vcols, stride_t, ".cg")
    dy = load_rows_cached(dy_ptr, base, rows, T, vcols, stride_t, ".cg")
    u = tl.load(u_ptr + h * N + kcols)
    u_dA = u[None, :] * dA_diag[:, None]
    # through the state at the sub-block's start: S_J, read by every row (pre_t holds d_m for m < t)
    S = sub_block_start(s0_ptr, states_ptr, k_ptr, v_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                        N, C, LOG_C, STATE_PREC, PIECES, MASK_PREC, HAS_S0, HAS_STATES, VARLEN)
    x_state = pre_factor(g, LOG_C, C, PIECES, MASK_PREC) * mm(dy, tl.trans(S), STATE_PREC)    # pre_t * (S_J dy_t)
    store_rows(dr_ptr, base, rows, T, kcols, stride_t, dr + u_dA * k + x_state)
    dg += masked_sum(after_mask(C, LOG_C), r * x_state, DG_PIECES, MASK_PREC)      # sum over t > m
    # through the gradient of the state at the sub-block's end: dS_J (suf_s holds d_m for m > s)
    dS = sub_block_end_grad(dstates_ptr, r_ptr, dy_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                            N, L, C, LOG_C, STATE_PREC, PIECES, MASK_PREC)
    suf = suf_factor(g, LOG_C, C, PIECES, MASK_PREC)
    dS_v = mm(v, tl.trans(dS), STATE_PREC)                                      # dS_J v_s
    kq = k * suf
    store_rows(dk_ptr, base, rows, T, kcols, stride_t, dk + u_dA * r + suf * dS_v)
    dv = mm(tl.trans(A), dy, PREC) + tl.sum(r * u[None, :] * k, 1)[:, None] * dy + mm(kq, dS, STATE_PREC)
    store_rows(dv_ptr, base, rows, T, vcols, stride_t, dv)
    dg += masked_sum(before_mask(C, LOG_C), kq * dS_v, DG_PIECES, MASK_PREC)       # sum over s < m
    dg += (exp(tl.sum(g, 0)) * tl.sum(S * dS, 1))[None, :]             # the state through the whole sub-block
    store_rows(dw_ptr, base, rows, T, kcols, stride_t, tl.where(g > G_ZERO, dg * g, 0.0))
    # du partials: (B * H * NC * L / C, N), one row a program, summed by the caller
    tl.store(du_ptr + pid.to(tl.int64) * N + kcols, tl.sum(r * k * dA_diag[:, None], 0))


def launch_backward(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, precisions, settings, L,
                    varlen=None):
    """precisions: the shared.Precisions of the inputs; settings: settings.Settings (backward_split: the two kernels
    of backward_split.py instead); L: the chunk length;
    du_part: (B * H * NC * L / C, N) float32; varlen: None, or for packed sequences their common.Varlen (as
    launch_forward)."""
    if settings.backward_split:
        return launch_backward_split(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, precisions,
                                     settings, L, varlen)
    B, T, H, N = r.shape
    chunks, NC = launch_chunks(T, L, varlen)
    C = settings.sub_block
    launch = settings.backward_for(N)
    grid = (B * H * NC * (L // C),)
    has_states = states.numel() > 0   # none when NC == 1
    backward_kernel[grid](r, k, v, w, u, s0, states if has_states else None, dstates, dy,
                          dr, dk, dv, dw, du_part, chunks, level_table_for(settings, r.device), T, H, NC, H * N,
                          N=N, L=L, C=C, LOG_C=C.bit_length() - 1, **precision_args(precisions),
                          HAS_S0=s0 is not None, HAS_STATES=has_states, VARLEN=varlen is not None,
                          MASK_TABLE=settings.mask_table,
                          **launch_options(launch))
