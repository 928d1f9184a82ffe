"""The engine's entry point and its `jax.custom_vjp`.

Forward without differentiation: the step-by-step kernel for T <= decode_max_t, else the chunked ops.
Under differentiation the forward always runs chunked and keeps the states at the chunk starts ((B, H, nc, N, N),
in core.state_dtype) for the backward, which rebuilds everything else inside each chunk.
"""
import functools

import jax
import jax.numpy as jnp

from . import ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _wkv(r, k, v, w, u, s0, config):
    L, prec, decode_max_t, in_place = config
    if r.shape[1] <= decode_max_t:
        return ops.decode(in_place)(r, k, v, w, u, s0)
    y, last, _ = ops.forward(L, prec)(r, k, v, w, u, s0)
    return y, last


def _wkv_fwd(r, k, v, w, u, s0, config):
    L, prec, _, _ = config
    y, last, starts = ops.forward(L, prec)(r, k, v, w, u, s0)
    return (y, last), (r, k, v, w, u, starts)


def _wkv_bwd(config, residuals, cotangents):
    L, prec, _, _ = config
    r, k, v, w, u, starts = residuals
    dy, dlast = cotangents
    return ops.backward(L, prec)(r, k, v, w, u, starts, dy.astype(r.dtype), dlast.astype(jnp.float32))


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


@functools.partial(jax.jit, static_argnames=("chunk", "low_precision", "decode_max_t", "in_place"))
def wkv(r, k, v, w, u, s0, *, chunk=32, low_precision="tf32", decode_max_t=16, in_place=False):
    """r, k, v, w: (B, T, H, N) of one float dtype; u: (H, N); s0: (B, H, N, N) float32 or None.

    Jitted: called eagerly, one cached program runs instead of a dozen dispatches; inside a caller's jit (or
    grad, vmap, shard_map) it is simply inlined. in_place: the step-by-step kernel writes the final state over s0's
    buffer (recurrent.py), for callers inside a jitted loop or with a donated state."""
    B, T, H, N = r.shape
    u = jnp.broadcast_to(jnp.asarray(u, jnp.float32)[None], (B, H, N))
    s0 = jnp.zeros((B, H, N, N), jnp.float32) if s0 is None else jnp.asarray(s0, jnp.float32)
    config = (ops.chunk_length(T, chunk), ops.precision(r.dtype, low_precision), decode_max_t, in_place)
    return _wkv(r, k, v, w, u, s0, config)


@functools.partial(jax.jit, static_argnames=("chunk", "low_precision", "decode_max_t", "in_place"))
def decode(r, k, v, w, u, s0, *, chunk=32, low_precision="tf32", decode_max_t=16, in_place=False):
    """wkv of one token on (B, 1, C) inputs, the heads given by u (H, N): y (B, 1, C) and the final state. One jitted
    program with the reshapes, for eager callers."""
    B, T, C = r.shape
    H, N = u.shape
    y, state = wkv(*(x.reshape(B, T, H, N) for x in (r, k, v, w)), u, s0, chunk=chunk, low_precision=low_precision,
                   decode_max_t=decode_max_t, in_place=in_place)
    return y.reshape(B, T, C), state
