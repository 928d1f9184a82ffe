"""The chunk-parallel backward kernel (docs/math.md, "The backward pass").

One program per (chunk c, head h, row b). With S0 the state at the chunk start (forward scan) and D the
gradient of the state at the chunk end (backward scan), everything is local to the chunk:

    dA[t, s] = dy_t . v_s                      e = dy_t . v_t (the diagonal, element-wise)
    dr_t = sum_{s<t} dA[t, s] k_s W[t, s] + u k_t e_t + pre_t * (S0 dy_t)
    dk_s = sum_{t>s} dA[t, s] r_t W[t, s] + u r_s e_s + suf_s * (D v_s)
    dv_s = sum_{t>s} A[t, s] dy_t + bonus_s dy_s + D^T (k_s * suf_s)
    du  += sum_t r_t k_t e_t
    dw = dg * g  (0 where w is clamped at W_MAX)

dg_m collects every term whose weight holds d_m. docs/math.md writes it as sum_{t>m} X_t - sum_{s>=m} Y_s
+ ...: a difference of sums that cancel where decays are strong (dg ~ 0 from O(1) terms; seen: 3e-5 relative
error in dw). Here each sum holds only terms that really span m, so nothing cancels:

    dg_m = sum_h [ sum_{t>m, t in m's h-block} X^h_t + sum_{s<m, s in m's h-block} Y^h_s ]     (pairs)
         + sum_{t>m} r_t pre_t (S0 dy_t) + sum_{s<m} k_s suf_s (D v_s) + tot * sum_j S0[:, j] D[:, j]

with X^h_t = r_t * (the level-h part of dr_t), Y^h_s = k_s * (the level-h part of dk_s): a pair (t, s)
split at level h has s in the upper half and t in the lower half of one 2h-block, so for m in the lower
half exactly the t > m of that half span it, and for m in the upper half exactly the s < m. Each sum is
a masked product with exact 0/1 weights (core.masked_sum).
"""
import functools

import jax
import jax.numpy as jnp

from . import core
from .chunked import blocks, chunk_rows, load_keys
from .intra import bonus, scaled


def _grads_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, dy_ref, s_ref, d_ref,
                  dr_ref, dk_ref, dv_ref, dw_ref, du_ref, *, T, L, N, prec):
    c, rows, valid = chunk_rows(L, T)
    h, b = core.program_id(1), core.program_id(2)
    size, n = blocks(N)
    kcols = [core.ds(i * size, size) for i in range(n)]
    vcols = kcols
    vs = [core.load(v_ref.at[b, rows, h, cols], valid) for cols in vcols]
    dys = [core.load(dy_ref.at[b, rows, h, cols], valid) for cols in vcols]
    dA = e = None
    for v, dy in zip(vs, dys):
        part, diag_part = core.mm(dy, v, prec, tb=True), jnp.sum(dy * v, axis=1, keepdims=True)
        dA = part if dA is None else dA + part
        e = diag_part if e is None else e + diag_part
    keys = [load_keys(k_ref, w_ref, b, h, rows, valid, cols, L, r_ref=r_ref) for cols in kcols]
    us = [core.load(u_ref.at[b, h, cols])[None, :] for cols in kcols]

    # Intra-chunk pairs, level by level: A (for dv) and the pair parts of dr and dk share the factors.
    A = None
    dr_pairs, dk_pairs, dg_pairs = [None] * n, [None] * n, [None] * n
    for lvl in core.levels(L):
        pairs = core.pair_mask(L, lvl)
        dA_lvl = jnp.where(pairs, dA, 0.0)
        A_lvl = None
        for i, kb in enumerate(keys):
            e_pre, e_suf = kb.level(lvl)
            rq, kq = scaled(kb.r, e_pre), scaled(kb.k, e_suf)
            part = core.mm(rq, kq, prec, tb=True)
            A_lvl = part if A_lvl is None else A_lvl + part
            part_r = scaled(core.mm(dA_lvl, kq, prec), e_pre)
            part_k = scaled(core.mm(dA_lvl, rq, prec, ta=True), e_suf)
            dr_pairs[i] = part_r if dr_pairs[i] is None else dr_pairs[i] + part_r
            dk_pairs[i] = part_k if dk_pairs[i] is None else dk_pairs[i] + part_k
            if lvl > 1:   # at h = 1 no position lies between the two of a pair
                part_g = (core.masked_sum(core.after_mask(L, lvl), core.split3(kb.r * part_r))
                          + core.masked_sum(core.before_mask(L, lvl), core.split3(kb.k * part_k)))
                dg_pairs[i] = part_g if dg_pairs[i] is None else dg_pairs[i] + part_g
        A_lvl = jnp.where(pairs, A_lvl, 0.0)
        A = A_lvl if A is None else A + A_lvl

    diag = bonus(keys, us)
    dvs = [core.mm(A, dy, prec, ta=True) + diag * dy for dy in dys]
    after, before = core.after_mask(L, L), core.before_mask(L, L)
    for i, (kb, u) in enumerate(zip(keys, us)):
        e_pre, e_suf = kb.chunk_pre(), kb.chunk_suf()
        kq_end = kb.k * e_suf
        dyS = vD = SD = None
        for j in range(n):
            S = core.load(s_ref.at[b, h, c, kcols[i], vcols[j]])
            D = core.load(d_ref.at[b, h, c, kcols[i], vcols[j]])
            parts = (core.mm(dys[j], S, prec, tb=True), core.mm(vs[j], D, prec, tb=True),
                     jnp.sum(S * D, axis=1)[None, :])
            dyS, vD, SD = parts if dyS is None else (dyS + parts[0], vD + parts[1], SD + parts[2])
            dvs[j] = dvs[j] + core.mm(kq_end, D, prec)
        x_part = dr_pairs[i] + e_pre * dyS          # dr without the bonus term
        y_part = dk_pairs[i] + e_suf * vD           # dk without the bonus term
        ue = u * e
        dg = (core.masked_sum(after, core.split3(kb.r * e_pre * dyS))
              + core.masked_sum(before, core.split3(kq_end * vD)) + kb.chunk_tot() * SD)
        if dg_pairs[i] is not None:
            dg = dg + dg_pairs[i]
        w = core.load(w_ref.at[b, rows, h, kcols[i]], valid)
        dw = jnp.where(w > core.W_MAX, 0.0, dg * kb.g)
        core.store(dr_ref.at[b, rows, h, kcols[i]], x_part + ue * kb.k, valid)
        core.store(dk_ref.at[b, rows, h, kcols[i]], y_part + ue * kb.r, valid)
        core.store(dw_ref.at[b, rows, h, kcols[i]], dw, valid)
        core.store(du_ref.at[b, h, c, kcols[i]], jnp.sum(kb.r * kb.k * e, axis=0))
    for j in range(n):
        core.store(dv_ref.at[b, rows, h, vcols[j]], dvs[j], valid)


def grads(r, k, v, w, u, dy, starts, dends, *, L, prec):
    """dr, dk, dv, dw (B, T, H, N) in r's dtype and du per chunk (B, H, nc, N) float32."""
    B, T, H, N = r.shape
    nc = -(-T // L)
    kernel = functools.partial(_grads_kernel, T=T, L=L, N=N, prec=prec)
    like = jax.ShapeDtypeStruct(r.shape, r.dtype)
    return core.call(
        kernel, grid=(nc, H, B), num_warps=4, num_stages=1, name="wkv6_grads",
        out_shape=(like, like, like, like, jax.ShapeDtypeStruct((B, H, nc, N), jnp.float32)),
    )(r, k, v, w, u, dy, starts, dends)
