"""The backward chunk kernel: every gradient inside a chunk (docs/math.md, "The backward pass").

One program per (chunk c, head h, row b). With S the state at the chunk start (forward scan) and dS the
gradient of the state at the chunk end (backward scan), everything is local to the chunk:

    dA[t, s] = dy_t . v_s                      dA_diag_t = dy_t . v_t (the diagonal, element-wise)
    dr_t = sum_{s<t} dA[t, s] k_s W[t, s] + u k_t dA_diag_t + pre_t * (S dy_t)
    dk_s = sum_{t>s} dA[t, s] r_t W[t, s] + u r_s dA_diag_s + suf_s * (dS v_s)
    dv_s = sum_{t>s} A[t, s] dy_t + bonus_s dy_s + dS^T (k_s * suf_s)
    du  += sum_t r_t k_t dA_diag_t
    dw = dg * g  (0 where the decay exp(g) is 0 in float32, the clamp at W_MAX included)

dg_m collects every term whose weight holds d_m. docs/math.md writes it as sum_{t>m} X_t - sum_{s>=m} Y_s
+ ...: a difference of sums that cancel where decays are strong (dg ~ 0 from O(1) terms, so dw would lose its
relative accuracy). Here each sum holds only terms that really span m, so nothing cancels:

    dg_m = sum_h [ sum_{t>m, t in m's h-block} X^h_t + sum_{s<m, s in m's h-block} Y^h_s ]     (pairs)
         + sum_{t>m} r_t pre_t (S dy_t) + sum_{s<m} k_s suf_s (dS v_s) + tot * sum_j S[:, j] dS[:, j]

with X^h_t = r_t * (the level-h part of dr_t), Y^h_s = k_s * (the level-h part of dk_s): a pair (t, s)
split at level h has s in the upper half and t in the lower half of one 2h-block, so for m in the lower
half exactly the t > m of that half span it, and for m in the upper half exactly the s < m. Each sum is
a masked product with exact 0/1 weights (masks.masked_sum; the pairs: levels.pair_grads).

Key blocks of at most KEY_BLOCK channels are handled one after the other (only one block's tiles are live at a
time); every key-channel quantity above is per channel, and A, the only sum over channels, accumulates. Packed
sequences: the chunk table (engines/packed.py) gives each chunk's rows instead of c * L (common.rows_of), and
the unused chunks at its end only write their zero row of du.
"""
import functools

import jax
import jax.numpy as jnp

from ..shared import G_ZERO
from . import common, masks
from .levels import load_keys, pair_grads

KEY_BLOCK = 64


def backward_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, dy_ref, states_ref, dstates_ref, table_ref, levels_ref,
                    dr_ref, dk_ref, dv_ref, dw_ref, du_ref, *, T, L, N, precisions):
    def du_zero(c, h, b):   # an unused chunk of packed sequences has no rows to write, but du's rows are summed
        common.store(du_ref.at[b, h, c, common.ds(0, N)], jnp.zeros((N,), jnp.float32))

    common.chunk_program(table_ref, functools.partial(
        _chunk_gradients, r_ref, k_ref, v_ref, w_ref, u_ref, dy_ref, states_ref, dstates_ref, table_ref, levels_ref,
        dr_ref, dk_ref, dv_ref, dw_ref, du_ref, T=T, L=L, N=N, precisions=precisions), du_zero)


def _chunk_gradients(r_ref, k_ref, v_ref, w_ref, u_ref, dy_ref, states_ref, dstates_ref, table_ref, levels_ref,
                     dr_ref, dk_ref, dv_ref, dw_ref, du_ref, c, h, b, *, T, L, N, precisions):
    rows, valid = common.rows_of(c, L, T, table_ref)
    prec, sprec, mprec = precisions.prec, precisions.state_prec, precisions.mask_prec
    vsize, nv = common.blocks(N)
    ksize, nk = common.blocks(N, KEY_BLOCK)
    vcols = [common.ds(j * vsize, vsize) for j in range(nv)]
    vs = [common.load(v_ref.at[b, rows, h, cols], valid) for cols in vcols]
    dys = [common.load(dy_ref.at[b, rows, h, cols], valid) for cols in vcols]
    dA = dA_diag = None
    for v, dy in zip(vs, dys):
        dA = common.add(dA, common.mm(dy, v, prec, tb=True))
        dA_diag = common.add(dA_diag, jnp.sum(dy * v, axis=1, keepdims=True))
    K, npc = masks.log2(L), precisions.dg_pieces
    after, before = masks.after_mask(L, K), masks.before_mask(L, K)

    A = bonus = None
    dvs = [None] * nv
    for i in range(nk):
        kcols = common.ds(i * ksize, ksize)
        kb = load_keys(k_ref, w_ref, b, h, rows, valid, kcols, L, precisions, r_ref=r_ref, levels_ref=levels_ref)
        u = common.load(u_ref.at[b, h, kcols])[None, :]
        A, dr, dk, dg = pair_grads(kb, dA, A, precisions)
        bonus = common.add(bonus, jnp.sum(kb.r * u * kb.k, axis=1, keepdims=True))
        # The states: S enters through pre, dS through suf.
        pre, suf = kb.pre_factor(), kb.suf_factor()
        kq = kb.k * suf
        S_dy = dS_v = S_dS = None
        for j in range(nv):
            S = common.load(states_ref.at[b, h, c, kcols, vcols[j]])
            dS = common.load(dstates_ref.at[b, h, c, kcols, vcols[j]])
            S_dy = common.add(S_dy, common.mm(dys[j], S, sprec, tb=True))
            dS_v = common.add(dS_v, common.mm(vs[j], dS, sprec, tb=True))
            S_dS = common.add(S_dS, jnp.sum(S * dS, axis=1)[None, :])
            dvs[j] = common.add(dvs[j], common.mm(kq, dS, sprec))
        x_state, y_state = pre * S_dy, kq * dS_v
        dg = (dg + masks.masked_sum(after, masks.bf16_pieces(kb.r * x_state, npc), mprec)
              + masks.masked_sum(before, masks.bf16_pieces(y_state, npc), mprec) + kb.tot_factor() * S_dS)
        u_dA = u * dA_diag
        common.store(dr_ref.at[b, rows, h, kcols], dr + x_state + u_dA * kb.k, valid)
        common.store(dk_ref.at[b, rows, h, kcols], dk + suf * dS_v + u_dA * kb.r, valid)
        common.store(dw_ref.at[b, rows, h, kcols], jnp.where(kb.g > G_ZERO, dg * kb.g, 0.0), valid)
        common.store(du_ref.at[b, h, c, kcols], jnp.sum(kb.r * kb.k * dA_diag, axis=0))
    for j in range(nv):
        dv = dvs[j] + common.mm(A, dys[j], prec, ta=True) + bonus * dys[j]
        common.store(dv_ref.at[b, rows, h, vcols[j]], dv, valid)


def launch_backward(r, k, v, w, u, dy, states, dstates, *, L, precisions, settings, table=None):
    """dr, dk, dv, dw (B, T, H, N) in r's dtype and du per chunk (B, H, NC, N) float32; table: the (NC, 4) chunk
    table of packed sequences (B = 1), or None."""
    B, T, H, N = r.shape
    NC = common.num_chunks(T, L, table)
    kernel = functools.partial(backward_kernel, T=T, L=L, N=N, precisions=precisions)
    like = jax.ShapeDtypeStruct(r.shape, r.dtype)
    return common.launch(
        kernel, (r, k, v, w, u, dy, states, dstates, table, masks.level_table_for(settings, L)),
        grid=(NC, H, B),
        num_warps=settings.chunk_warps(settings.backward_warps, N, r.dtype), num_stages=1, name="wkv6_backward",
        out_shape=(like, like, like, like, jax.ShapeDtypeStruct((B, H, NC, N), jnp.float32)),
    )
