"""The scan over chunks: the only sequential part of the chunked engine.

    forward  (reverse=False):  out[c] = S;  S <- a_c * S + X_c   for c = 0, 1, ..., nc-1   (S starts at s0)
    backward (reverse=True):   out[c] = S;  S <- a_c * S + X_c   for c = nc-1, ..., 0       (S starts at dS_T)

a_c (a column over keys) scales the rows of S. Forward, out[c] is the state at the start of chunk c and the
final S the state after the last step; backward, out[c] is the gradient of the state at the end of chunk c
and the final S the gradient of s0. One program per (value block, head, row) carries an N x BV block of S in
registers through the chunks; the loads of X_c and a_c do not depend on S, so they pipeline.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import core


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


def scan(X, a, s0, *, reverse=False):
    """out (B, H, nc, N, N) and the final (B, H, N, N), float32."""
    B, H, nc, N, _ = X.shape
    BV = min(core.TUNING["scan_block"], N)
    kernel = functools.partial(_scan_kernel, nc=nc, BV=BV, reverse=reverse)
    return core.call(
        kernel, grid=(N // BV, H, B), num_warps=core.TUNING["scan_warps"], num_stages=3, name="wkv6_scan",
        out_shape=(jax.ShapeDtypeStruct(X.shape, jnp.float32),
                   jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)),
    )(X, a, s0)
