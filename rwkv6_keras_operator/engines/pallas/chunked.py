"""Chunk-parallel forward kernels: per-chunk state terms, and the outputs.

Every kernel here runs one program per (chunk c, head h, row b) and reads its L x N tiles straight from
the (B, T, H, N) arrays (rows past T are masked: zero inputs and g = 0, so padding changes nothing).

    state_terms:  X_c = sum_s (key_s * exp(E_s)) val_s^T,  a_c = exp(tot_c)                (N x N, N)
                  forward: key = k, val = v, E = suf (the decay from s to the chunk end)
                  backward: key = r, val = dy, E = pre (the decay from the chunk start to t)
    output:       y_t = sum_{s<t} A[t, s] v_s + bonus_t v_t + (r_t * exp(pre_t)) . S_c
                  with S_c the state at the chunk start (from scan.py).

Key and value dimensions are cut into blocks of at most 64 (static loops), so N = 128 or 256 keeps the
tiles small.
"""
import functools

import jax
import jax.numpy as jnp

from . import core
from .intra import ChunkKeys, bonus, scores


def blocks(N, most=64):
    """Block size (at most `most`) for a key or value dimension of size N, and the block count."""
    size = min(N, most)
    return size, N // size


def chunk_rows(L, T):
    c = core.program_id(0)
    t0 = c * L
    return c, core.ds(t0, L), ((t0 + jnp.arange(L)) < T)[:, None]


def load_keys(ref_key, w_ref, b, h, rows, valid, cols, L, precisions, r_ref=None):
    """ChunkKeys for one key block: key rows (and r rows if given), g = 0 on padding rows."""
    key = core.load(ref_key.at[b, rows, h, cols], valid)
    g = jnp.where(valid, core.log_decay(core.load(w_ref.at[b, rows, h, cols], valid)), 0.0)
    r = key if r_ref is None else core.load(r_ref.at[b, rows, h, cols], valid)
    return ChunkKeys(r, key, g, L, precisions)


# --------------------------------------------------------------------------------------------------------
def _terms_kernel(key_ref, val_ref, w_ref, x_ref, a_ref, *, T, L, N, precisions, reverse):
    c, rows, valid = chunk_rows(L, T)
    h, b = core.program_id(1), core.program_id(2)
    size, n = blocks(N)
    for i in range(n):
        kcols = core.ds(i * size, size)
        kb = load_keys(key_ref, w_ref, b, h, rows, valid, kcols, L, precisions)
        core.store(a_ref.at[b, h, c, kcols], kb.chunk_tot()[0])
        kq = kb.state_rows(reverse)
        for j in range(n):
            vcols = core.ds(j * size, size)
            val = core.load(val_ref.at[b, rows, h, vcols], valid)
            core.store(x_ref.at[b, h, c, kcols, vcols], core.mm(kq, val, precisions.state_prec, ta=True))


def state_terms(key, val, w, *, L, precisions, reverse=False):
    """X (B, H, nc, N, N) and a (B, H, nc, N), float32, for the scan over chunks."""
    B, T, H, N = key.shape
    nc = -(-T // L)
    kernel = functools.partial(_terms_kernel, T=T, L=L, N=N, precisions=precisions, reverse=reverse)
    return core.call(
        kernel, grid=(nc, H, B), num_warps=core.TUNING["terms_warps"], num_stages=2, name="wkv6_state_terms",
        out_shape=(jax.ShapeDtypeStruct((B, H, nc, N, N), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, nc, N), jnp.float32)),
    )(key, val, w)


# --------------------------------------------------------------------------------------------------------
def _output_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, s_ref, y_ref, *, T, L, N, precisions):
    c, rows, valid = chunk_rows(L, T)
    h, b = core.program_id(1), core.program_id(2)
    size, n = blocks(N)
    keys, us, r_pre = [], [], []
    for i in range(n):
        kcols = core.ds(i * size, size)
        kb = load_keys(k_ref, w_ref, b, h, rows, valid, kcols, L, precisions, r_ref=r_ref)
        keys.append(kb)
        us.append(core.load(u_ref.at[b, h, kcols])[None, :])
        r_pre.append(kb.r * kb.chunk_pre())
    # (L, L), strictly lower; long chunks: levels as a loop (at L = 32 a loop is slower: fwd 1.43 against 1.29 ms,
    # H200, training shape)
    A = scores(keys, L, precisions.prec, unroll=L <= 32)
    diag = bonus(keys, us)                    # (L, 1)
    for j in range(n):
        vcols = core.ds(j * size, size)
        v = core.load(v_ref.at[b, rows, h, vcols], valid)
        y = core.mm(A, v, precisions.prec) + diag * v
        for i in range(n):
            S = core.load(s_ref.at[b, h, c, core.ds(i * size, size), vcols])
            y = y + core.mm(r_pre[i], S, precisions.state_prec)
        core.store(y_ref.at[b, rows, h, vcols], y, valid)


def output(r, k, v, w, u, starts, *, L, precisions):
    """y (B, T, H, N) in r's dtype from the states at the chunk starts (B, H, nc, N, N)."""
    B, T, H, N = r.shape
    nc = -(-T // L)
    kernel = functools.partial(_output_kernel, T=T, L=L, N=N, precisions=precisions)
    return core.call(
        kernel, grid=(nc, H, B), num_warps=core.warps("output_warps", N, r.dtype),
        num_stages=core.TUNING["output_stages"], name="wkv6_output",
        out_shape=jax.ShapeDtypeStruct(r.shape, r.dtype),
    )(r, k, v, w, u, starts)
