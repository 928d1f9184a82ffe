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

from . import common


def step_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, s0_ref, y_ref, s1_ref, *, T, BV):
    j, h, b = common.program_id(0), common.program_id(1), common.program_id(2)
    vcols = common.ds(j * BV, BV)
    u = common.load(u_ref.at[b, h, :])[:, None]

    def step(t, S):
        r = common.load(r_ref.at[b, t, h, :])[:, None]
        k = common.load(k_ref.at[b, t, h, :])[:, None]
        d = common.exp(common.log_decay(common.load(w_ref.at[b, t, h, :])))[:, None]
        v = common.load(v_ref.at[b, t, h, vcols])[None, :]
        kv = k * v
        common.store(y_ref.at[b, t, h, vcols], jnp.sum(r * (u * kv + S), axis=0))
        return d * S + kv

    S = lax.fori_loop(0, T, step, common.load(s0_ref.at[b, h, :, vcols]))
    common.store(s1_ref.at[b, h, :, vcols], S)


def launch_step(r, k, v, w, u, s0, settings):
    """y (B, T, H, N) in r's dtype and the final state (B, H, N, N) float32."""
    B, T, H, N = r.shape
    BV = min(settings.recurrent_block, N)
    kernel = functools.partial(step_kernel, T=T, BV=BV)
    return common.call(
        kernel, grid=(N // BV, H, B), num_warps=settings.recurrent_warps, num_stages=2, name="wkv6_recurrent",
        out_shape=(jax.ShapeDtypeStruct(r.shape, r.dtype),
                   jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)),
    )(r, k, v, w, u, s0)
