"""The backward chunk kernel split in two by the side of the pairs (Settings.backward_split; docs/math.md, "The
backward pass"), so that each kernel holds fewer tiles through the level loop than backward.backward_kernel.

The fused kernel holds, through its level loop, r, k, g, dr, dk, dg and the level's temporaries of both sides
(r * F_h, k * F_h and their parts of dr and dk). A level's dr part needs k * F_h only, its dk part r * F_h only,
and each enters dg on its own rows (dr's on the lower halves, dk's on the upper halves: levels.pair_grads sums
them in one masked product). So the work splits into two kernels over the same grid (one program per sub-block),
each a direct sum of exactly the terms of its side (every dg term enters once, nothing cancels):

    rows kernel (t side):  dr (pairs, bonus, pre_t * (S_J dy_t)), dg's pair terms of dr, its state-read terms
                           (sum over t > m) and tot_J * rowsum(S_J * dS_J), du partials;
                           writes dr and dg_rows (float32, a scratch the size of dw)
    keys kernel (s side):  A (for dv), dk (pairs, bonus, suf_s * (dS_J v_s)), dv, dg's pair terms of dk and its
                           state-written terms (sum over s < m); reads dg_rows, writes dk, dv and dw

The scratch is the only traffic the split adds besides reading the inputs twice: one float32 tile of dg written
and read (two bfloat16 inputs' worth). The rows kernel is the lighter one (no A, no dv), so it takes the state
term that needs both S_J and dS_J; the keys kernel never loads S_J.
"""
import torch
import triton
import triton.language as tl

from .common import (G_ZERO, chunk_rows, exp, g_rows, launch_chunks, load_rows, load_rows_cached, mm,
                     precision_args, store_rows)
from .levels import level_factor, level_span_sum, pre_factor, suf_factor
from .masks import after_mask, before_mask, level_table_for, masked_sum, pair_mask
from .sub_blocks import step_over, sub_block, sub_block_start


@triton.jit
def sub_block_tiles(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, base, rows, T, kcols, stride_t):
    """The sub-block's tiles r, k, g, v, dy (C x N, all channels; g 0 past T: decay 1)."""
    r = load_rows(r_ptr, base, rows, T, kcols, stride_t)
    k = load_rows(k_ptr, base, rows, T, kcols, stride_t)
    g = g_rows(w_ptr, base, rows, rows >= 0, T, kcols, stride_t)
    v = load_rows(v_ptr, base, rows, T, kcols, stride_t)
    dy = load_rows(dy_ptr, base, rows, T, kcols, stride_t)
    return r, k, g, v, dy


@triton.jit
def pair_side(own, other, dA, g, levels_ptr, KEYS: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
              PREC: tl.constexpr, PIECES: tl.constexpr, DG_PIECES: tl.constexpr, MASK_PREC: tl.constexpr,
              MASK_TABLE: tl.constexpr):
    """One side of levels.pair_grads. KEYS False: own = r, other = k, the rows t of each pair:
    (zeros, dr, dg's terms r_t dr^h[t]); KEYS True: own = k, other = r, the rows s:
    (A, dk, dg's terms k_s dk^h[s]). A's level products need both factors, so only the keys side builds A."""
    p = pair_mask(C, 0)
    dA_h = tl.where(p, dA, 0.0)
    if KEYS:
        dA_h = tl.trans(dA_h)
    d_own = mm(dA_h, other, PREC)                        # h = 1: W = 1, no row in between (nothing for dg)
    A = tl.zeros((C, C), dtype=tl.float32)
    if KEYS:
        A = tl.where(p, mm(other, tl.trans(own), PREC), 0.0)
    dg = tl.zeros_like(own)
    for shift in range(1, LOG_C):
        p = pair_mask(C, shift)
        dA_h = tl.where(p, dA, 0.0)
        if KEYS:
            dA_h = tl.trans(dA_h)
        F = level_factor(g, shift, levels_ptr, C, PIECES, MASK_PREC, MASK_TABLE)   # pre_h on rows t, suf_h on rows s
        oq = other * F
        if KEYS:
            A += tl.where(p, mm(oq, tl.trans(own * F), PREC), 0.0)
        part = mm(dA_h, oq, PREC) * F                       # non-zero on this side's half of each block only
        dg += level_span_sum(own * part, shift, levels_ptr, C, DG_PIECES, MASK_PREC, MASK_TABLE)
        d_own += part
    return A, d_own, dg


@triton.jit
def sub_block_end_grad(dstates_ptr, r_ptr, dy_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                       N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
                       STATE_PREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """dS_J: the gradient of the state at the end of sub-block J of chunk c, carried back from the chunk's end over
    the sub-blocks after J."""
    dS = tl.load(dstates_ptr + (bh.to(tl.int64) * NC + c) * N * N + kcols[:, None] * N + vcols[None, :]).to(tl.float32)
    for i in range(L // C - 1 - J):
        dS = step_over(dS, r_ptr, dy_ptr, w_ptr, base, (L // C - 1 - i) * C, T, stride_t, kcols, vcols, C, LOG_C,
                       STATE_PREC, PIECES, MASK_PREC, True)
    return dS


@triton.jit
def backward_rows_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, dstates_ptr, dy_ptr,
                         dr_ptr, dg_ptr, du_ptr, chunks_ptr, levels_ptr,
                         T, H, NC, stride_t,
                         N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                         STATE_PREC: tl.constexpr, PIECES: tl.constexpr, DG_PIECES: tl.constexpr,
                         MASK_PREC: tl.constexpr, HAS_S0: tl.constexpr, HAS_STATES: tl.constexpr,
                         VARLEN: tl.constexpr, MASK_TABLE: tl.constexpr):
    """The t side: dr, du partials and dg_rows (see the module's docstring)."""
    tl.static_assert(C == 1 << LOG_C, "the sub-block C must be 2^LOG_C rows")
    tl.static_assert(L % C == 0, "a chunk of L rows must be whole sub-blocks of C rows")
    pid = tl.program_id(0)
    bh, c, J = sub_block(pid, NC, L, C)
    b = bh // H
    h = bh % H
    base, T = chunk_rows(chunks_ptr, b, h, c, T, stride_t, N, L, VARLEN)
    if VARLEN:
        if T <= 0:   # a chunk past the packed sequences' last one: no rows (and no state stored for it)
            return
    kcols = tl.arange(0, N)
    vcols = kcols                                                          # all value channels
    rows = J * C + tl.arange(0, C)
    r, k, g, v, dy = sub_block_tiles(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, base, rows, T, kcols, stride_t)
    dA_diag = tl.sum(dy * v, 1)                                            # dA[t, t]
    _, dr, dg = pair_side(r, k, mm(dy, tl.trans(v), PREC), g, levels_ptr, False, C, LOG_C, PREC, PIECES, DG_PIECES,
                          MASK_PREC, MASK_TABLE)
    dy = load_rows_cached(dy_ptr, base, rows, T, vcols, stride_t, ".cg")   # again, not held through the levels
    u = tl.load(u_ptr + h * N + kcols)
    S = sub_block_start(s0_ptr, states_ptr, k_ptr, v_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                        N, C, LOG_C, STATE_PREC, PIECES, MASK_PREC, HAS_S0, HAS_STATES, VARLEN)
    x_state = pre_factor(g, LOG_C, C, PIECES, MASK_PREC) * mm(dy, tl.trans(S), STATE_PREC)    # pre_t * (S_J dy_t)
    store_rows(dr_ptr, base, rows, T, kcols, stride_t, dr + u[None, :] * dA_diag[:, None] * k + x_state)
    dg += masked_sum(after_mask(C, LOG_C), r * x_state, DG_PIECES, MASK_PREC)      # sum over t > m
    dS = sub_block_end_grad(dstates_ptr, r_ptr, dy_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                            N, L, C, LOG_C, STATE_PREC, PIECES, MASK_PREC)
    dg += (exp(tl.sum(g, 0)) * tl.sum(S * dS, 1))[None, :]             # the state through the whole sub-block
    store_rows(dg_ptr, base, rows, T, kcols, stride_t, dg)
    # du partials: (B * H * NC * L / C, N), one row a program, summed by the caller
    tl.store(du_ptr + pid.to(tl.int64) * N + kcols, tl.sum(r * k * dA_diag[:, None], 0))


@triton.jit
def backward_keys_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, dstates_ptr, dy_ptr, dg_ptr,
                         dk_ptr, dv_ptr, dw_ptr, chunks_ptr, levels_ptr,
                         T, H, NC, stride_t,
                         N: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, PREC: tl.constexpr,
                         STATE_PREC: tl.constexpr, PIECES: tl.constexpr, DG_PIECES: tl.constexpr,
                         MASK_PREC: tl.constexpr, VARLEN: tl.constexpr, MASK_TABLE: tl.constexpr):
    """The s side: dk, dv, and dw from its dg terms plus dg_rows (see the module's docstring)."""
    tl.static_assert(C == 1 << LOG_C, "the sub-block C must be 2^LOG_C rows")
    tl.static_assert(L % C == 0, "a chunk of L rows must be whole sub-blocks of C rows")
    bh, c, J = sub_block(tl.program_id(0), NC, L, C)
    b = bh // H
    h = bh % H
    base, T = chunk_rows(chunks_ptr, b, h, c, T, stride_t, N, L, VARLEN)
    if VARLEN:
        if T <= 0:
            return
    kcols = tl.arange(0, N)
    vcols = kcols                                                          # all value channels
    rows = J * C + tl.arange(0, C)
    r, k, g, v, dy = sub_block_tiles(r_ptr, k_ptr, v_ptr, w_ptr, dy_ptr, base, rows, T, kcols, stride_t)
    dA_diag = tl.sum(dy * v, 1)                                            # dA[t, t]
    A, dk, dg = pair_side(k, r, mm(dy, tl.trans(v), PREC), g, levels_ptr, True, C, LOG_C, PREC, PIECES, DG_PIECES,
                          MASK_PREC, MASK_TABLE)
    v = load_rows_cached(v_ptr, base, rows, T, vcols, stride_t, ".cg")
    dy = load_rows_cached(dy_ptr, base, rows, T, vcols, stride_t, ".cg")
    u = tl.load(u_ptr + h * N + kcols)
    dS = sub_block_end_grad(dstates_ptr, r_ptr, dy_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                            N, L, C, LOG_C, STATE_PREC, PIECES, MASK_PREC)
    suf = suf_factor(g, LOG_C, C, PIECES, MASK_PREC)
    dS_v = mm(v, tl.trans(dS), STATE_PREC)                                      # dS_J v_s
    kq = k * suf
    store_rows(dk_ptr, base, rows, T, kcols, stride_t, dk + u[None, :] * dA_diag[:, None] * r + suf * dS_v)
    dv = mm(tl.trans(A), dy, PREC) + tl.sum(r * u[None, :] * k, 1)[:, None] * dy + mm(kq, dS, STATE_PREC)
    store_rows(dv_ptr, base, rows, T, vcols, stride_t, dv)
    dg += masked_sum(before_mask(C, LOG_C), kq * dS_v, DG_PIECES, MASK_PREC)       # sum over s < m
    dg += load_rows(dg_ptr, base, rows, T, kcols, stride_t)                        # the rows kernel's terms
    store_rows(dw_ptr, base, rows, T, kcols, stride_t, tl.where(g > G_ZERO, dg * g, 0.0))


def launch_backward_split(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, precisions, settings, L,
                          varlen=None):
    """launch_backward's contract (backward.py), by the two kernels above."""
    dg_rows = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    launch_rows(r, k, v, w, u, s0, states, dstates, dy, dr, dg_rows, du_part, precisions, settings, L, varlen)
    launch_keys(r, k, v, w, u, dstates, dy, dg_rows, dk, dv, dw, precisions, settings, L, varlen)


def launch_rows(r, k, v, w, u, s0, states, dstates, dy, dr, dg_rows, du_part, precisions, settings, L, varlen=None):
    """The rows kernel; dg_rows: float32, r's shape (its part of dg, for launch_keys)."""
    grid, geometry, chunks, table, NC = split_geometry(r, precisions, settings, L, varlen)
    has_states = states.numel() > 0   # none when NC == 1
    backward_rows_kernel[grid](r, k, v, w, u, s0, states if has_states else None, dstates, dy, dr, dg_rows, du_part,
                               chunks, table, r.shape[1], r.shape[2], NC, r.shape[2] * r.shape[3], **geometry,
                               HAS_S0=s0 is not None, HAS_STATES=has_states,
                               **launch_options(settings.backward_split_for(r.shape[3])[0]))


def launch_keys(r, k, v, w, u, dstates, dy, dg_rows, dk, dv, dw, precisions, settings, L, varlen=None):
    """The keys kernel, after launch_rows has written dg_rows."""
    grid, geometry, chunks, table, NC = split_geometry(r, precisions, settings, L, varlen)
    backward_keys_kernel[grid](r, k, v, w, u, dstates, dy, dg_rows, dk, dv, dw, chunks, table, r.shape[1], r.shape[2],
                               NC, r.shape[2] * r.shape[3], **geometry,
                               **launch_options(settings.backward_split_for(r.shape[3])[1]))


def split_geometry(r, precisions, settings, L, varlen):
    """(grid, the kernels' shared constexprs, the chunk table or None, the level table or None, NC) of a call on
    inputs shaped as r."""
    B, T, H, N = r.shape
    chunks, NC = launch_chunks(T, L, varlen)
    C = settings.sub_block
    geometry = dict(N=N, L=L, C=C, LOG_C=C.bit_length() - 1, **precision_args(precisions), VARLEN=varlen is not None,
                    MASK_TABLE=settings.mask_table)
    return (B * H * NC * (L // C),), geometry, chunks, level_table_for(settings, r.device), NC


def launch_options(launch):
    """A settings.BackwardLaunch as a launch's keyword arguments."""
    return dict(num_warps=launch.num_warps, num_stages=launch.num_stages,
                **({"maxnreg": launch.maxnreg} if launch.maxnreg else {}))
