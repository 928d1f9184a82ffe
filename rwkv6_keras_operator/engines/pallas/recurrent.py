"""The step-by-step kernel for short sequences (decode: T = 1 with a carried state).

One program per (value block, head, row) holds an N x BV block of the state in registers and walks the
tokens in order, exactly as the contract reads (docs/math.md, "The recurrence"):

    y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S[i, j]),   S[i, j] <- d_t[i] S[i, j] + k_t[i] v_t[j]

Element-wise float32 only (no matrix products), so it is exact for every input dtype.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import core


def _step_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, s0_ref, y_ref, s_ref, *, T, BV):
    j, h, b = core.program_id(0), core.program_id(1), core.program_id(2)
    vcols = core.ds(j * BV, BV)
    u = core.load(u_ref.at[b, h, :])[:, None]

    def step(t, S):
        r = core.load(r_ref.at[b, t, h, :])[:, None]
        k = core.load(k_ref.at[b, t, h, :])[:, None]
        d = core.exp(core.log_decay(core.load(w_ref.at[b, t, h, :])))[:, None]
        v = core.load(v_ref.at[b, t, h, vcols])[None, :]
        kv = k * v
        core.store(y_ref.at[b, t, h, vcols], jnp.sum(r * (u * kv + S), axis=0))
        return d * S + kv

    S = lax.fori_loop(0, T, step, core.load(s0_ref.at[b, h, :, vcols]))
    core.store(s_ref.at[b, h, :, vcols], S)


def recurrent(r, k, v, w, u, s0):
    """y (B, T, H, N) in r's dtype and the final state (B, H, N, N) float32."""
    B, T, H, N = r.shape
    BV = min(core.TUNING["recurrent_block"], N)
    kernel = functools.partial(_step_kernel, T=T, BV=BV)
    return core.call(
        kernel, grid=(N // BV, H, B), num_warps=core.TUNING["recurrent_warps"], num_stages=2, name="wkv6_recurrent",
        out_shape=(jax.ShapeDtypeStruct(r.shape, r.dtype),
                   jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)),
    )(r, k, v, w, u, s0)
