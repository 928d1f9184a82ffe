"""A state pool stepped by the Pallas engine: one token for the rows whose states are pool[slots]
(RWKVKernelOperator.step).

Functional, as jax is: the kernel's pool output aliases its pool input (recurrent.pool_step), so XLA writes the
advanced rows where they lie whenever the input buffer is free to be overwritten: with the pool donated to a jitted
step (jax.jit(..., donate_argnums=...)) or carried through a loop (lax.scan, fori_loop, while_loop), a step moves
only the rows it advances. Called eagerly, or inside jit without donating the pool, XLA first copies the pool, so
that the caller's array stays valid.
"""
import functools

import jax
import jax.numpy as jnp

from . import recurrent


@functools.partial(jax.jit, inline=True)
def pool_step(r, k, v, w, u, pool, slots):
    """r, k, v, w: (B, C) or (B, 1, C); u: (H, N); pool: (n, H, N, N) float32; slots: (B,) ints, distinct. Returns y
    in r's shape and dtype, and the pool with the rows `slots` advanced by one token."""
    B = r.shape[0]
    H, N = u.shape
    heads = [x.reshape(B, 1, H, N) for x in (r, k, v, w)]
    y, pool = recurrent.pool_step(*heads, u.astype(jnp.float32), pool, slots.astype(jnp.int32))
    return y.reshape(r.shape), pool
