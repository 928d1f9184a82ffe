"""The scan over chunks: the only sequential part of the chunked engine.

    forward  (reverse=False):  out[c] = S;  S <- a_c * S + X_c   for c = 0, 1, ..., nc-1   (S starts at s0)
    backward (reverse=True):   out[c] = S;  S <- a_c * S + X_c   for c = nc-1, ..., 0       (S starts at dS_T)

a_c (a column over keys) scales the rows of S. Forward, out[c] is the state at the start of chunk c and the
final S the state after the last step; backward, out[c] is the gradient of the state at the end of chunk c
and the final S the gradient of s0. `states` picks one of two ways:

    enough programs (rows x heads x state blocks >= TUNING["fused_min_programs"]; below
        TUNING["fused_narrow_below"] the key blocks narrow to TUNING["fused_keys_few"] rows): one kernel that builds X_c and a_c from the chunk's own
        rows as it goes (chunked.ChunkKeys), so X never goes through memory, its loads pipelined ahead of the
        chain (TUNING["fused_stages"]);
    fewer (short inputs, few rows and heads): chunked.state_terms builds every X_c at once (in parallel over
        chunks), then `scan` carries S through them; its loads do not depend on S, so they pipeline, and the
        sequential steps stay short.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import core
from .chunked import blocks, load_keys, state_terms


def _scan_kernel(x_ref, a_ref, s0_ref, out_ref, last_ref, *, nc, BV, reverse):
    j, h, b = core.program_id(0), core.program_id(1), core.program_id(2)
    vcols = core.ds(j * BV, BV)

    def step(i, S):
        c = nc - 1 - i if reverse else i
        X = core.load(x_ref.at[b, h, c, :, vcols])
        a = core.load(a_ref.at[b, h, c, :])[:, None]
        core.store(out_ref.at[b, h, c, :, vcols], S)
        return a * S + X

    S = lax.fori_loop(0, nc, step, core.load(s0_ref.at[b, h, :, vcols]))
    core.store(last_ref.at[b, h, :, vcols], S)


def scan(X, a, s0, *, precisions, reverse=False):
    """out (B, H, nc, N, N) in precisions.states_dtype and the final (B, H, N, N) float32."""
    B, H, nc, N, _ = X.shape
    BV = min(core.TUNING["scan_block"], N)
    kernel = functools.partial(_scan_kernel, nc=nc, BV=BV, reverse=reverse)
    return core.call(
        kernel, grid=(N // BV, H, B), num_warps=core.TUNING["scan_warps"], num_stages=3, name="wkv6_scan",
        out_shape=(jax.ShapeDtypeStruct(X.shape, precisions.states_dtype),
                   jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)),
    )(X, a, s0)


def _fused_kernel(key_ref, val_ref, w_ref, s0_ref, out_ref, last_ref, *, T, L, nc, N, BK, BV, precisions, reverse):
    j, h, b = core.program_id(0), core.program_id(1), core.program_id(2)
    kcols = core.ds((j // (N // BV)) * BK, BK)
    vcols = core.ds((j % (N // BV)) * BV, BV)

    def step(i, S):
        c = nc - 1 - i if reverse else i
        rows = core.ds(c * L, L)
        valid = ((c * L + jnp.arange(L)) < T)[:, None]
        kb = load_keys(key_ref, w_ref, b, h, rows, valid, kcols, L, precisions)
        val = core.load(val_ref.at[b, rows, h, vcols], valid)
        core.store(out_ref.at[b, h, c, kcols, vcols], S)
        return kb.chunk_tot()[0][:, None] * S + core.mm(kb.state_rows(reverse), val, precisions.state_prec, ta=True)

    S = lax.fori_loop(0, nc, step, core.load(s0_ref.at[b, h, kcols, vcols]))
    core.store(last_ref.at[b, h, kcols, vcols], S)


def states(key, val, w, s0, *, L, precisions, reverse=False):
    """out (B, H, nc, N, N) in precisions.states_dtype and the final (B, H, N, N) float32 of the scan whose
    X_c = sum over the chunk's rows of (key * decay) val^T (decay: to the chunk's end forward, from its start
    backward) and a_c = exp(tot_c)."""
    B, T, H, N = key.shape
    nc = -(-T // L)
    BV = min(core.TUNING["fused_block"], N)

    def programs(BK):
        return B * H * (N // BK) * (N // BV)

    BK = blocks(N, core.TUNING["fused_keys"])[0]
    if programs(BK) < core.TUNING["fused_narrow_below"]:   # few rows and heads: narrower key blocks, more programs
        BK = blocks(N, core.TUNING["fused_keys_few"])[0]
    if programs(BK) < core.TUNING["fused_min_programs"]:
        X, a = state_terms(key, val, w, L=L, precisions=precisions, reverse=reverse)
        return scan(X, a, s0, precisions=precisions, reverse=reverse)
    kernel = functools.partial(_fused_kernel, T=T, L=L, nc=nc, N=N, BK=BK, BV=BV, precisions=precisions,
                               reverse=reverse)
    return core.call(
        kernel, grid=((N // BK) * (N // BV), H, B), num_warps=core.TUNING["fused_warps"],
        num_stages=core.TUNING["fused_stages"],
        name="wkv6_state_scan",
        out_shape=(jax.ShapeDtypeStruct((B, H, nc, N, N), precisions.states_dtype),
                   jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)),
    )(key, val, w, s0)
