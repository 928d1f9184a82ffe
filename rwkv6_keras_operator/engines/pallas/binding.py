"""The kernels bound to jax: the engine's ops as compositions of kernel launches, and one `jax.custom_vjp`.

    forward_op(r, k, v, w, u, s0)                 -> y, final state, states (the state at every chunk start)
    backward_op(r, k, v, w, u, states, dy, dsT)   -> dr, dk, dv, dw, du, ds0
    decode_op(r, k, v, w, u, s0)                  -> y, final state          (step by step, short T; in_place:
                                                                             written over s0)

r, k, v, w, dy: (B, T, H, N) of one dtype; u: (B, H, N) float32 (one row per batch row, so that folding vmapped
axes into B stays exact); s0, dsT: (B, H, N, N) float32. Every op maps (row, head) pairs independently, which
`sharding.parallel_op` turns into vmap and SPMD rules.

Forward without differentiation: the step-by-step kernel for T <= settings.decode_max_t, else the chunked ops. Under
differentiation the forward always runs chunked and keeps the states at the chunk starts ((B, H, nc, N, N), in
Precisions.states_dtype) for the backward, which rebuilds everything else inside each chunk.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import shared
from ..shared import Precision
from . import backward, common, forward, recurrent, scan
from .settings import Settings
from .sharding import parallel_op

X4 = "b t h n"
U = "b h n"
S = "b h n m"
STATES = "b h c n m"


def forward_impl(r, k, v, w, u, s0, *, L, precisions, settings):
    states, last = scan.launch_scan(k, v, w, s0, L=L, precisions=precisions, settings=settings)
    y = forward.launch_forward(r, k, v, w, u, states, L=L, precisions=precisions, settings=settings)
    return y, last, states


def backward_impl(r, k, v, w, u, states, dy, dsT, *, L, precisions, settings):
    dstates, ds0 = scan.launch_scan(r, dy, w, dsT, L=L, precisions=precisions, settings=settings, reverse=True)
    dr, dk, dv, dw, du = backward.launch_backward(r, k, v, w, u, dy, states, dstates, L=L, precisions=precisions,
                                                  settings=settings)
    return dr, dk, dv, dw, du.sum(axis=2), ds0


def decode_impl(r, k, v, w, u, s0, *, in_place):
    return recurrent.launch_step(r, k, v, w, u, s0, in_place=in_place)


@functools.lru_cache(maxsize=None)
def forward_op(L, precisions, settings):
    return parallel_op(functools.partial(forward_impl, L=L, precisions=precisions, settings=settings),
                       (X4, X4, X4, X4, U, S), (X4, S, STATES))


@functools.lru_cache(maxsize=None)
def backward_op(L, precisions, settings):
    return parallel_op(functools.partial(backward_impl, L=L, precisions=precisions, settings=settings),
                       (X4, X4, X4, X4, U, STATES, X4, S), (X4, X4, X4, X4, U, S))


@functools.lru_cache(maxsize=None)
def decode_op(in_place=False):
    return parallel_op(functools.partial(decode_impl, in_place=in_place), (X4, X4, X4, X4, U, S), (X4, S))


def precisions(dtype, low_precision):
    """The shared.Precisions of the kernels for inputs of `dtype`; in the interpreter, float32 inputs get exact float32
    products (IEEE)."""
    p = shared.precisions(jnp.dtype(dtype).name, low_precision)
    if p.prec is Precision.TF32X3 and common.interpret():
        p = dataclasses.replace(p, prec=Precision.IEEE, state_prec=Precision.IEEE)
    return p


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _wkv(r, k, v, w, u, s0, config):
    L, precisions, settings, in_place = config
    if r.shape[1] <= settings.decode_max_t:
        return decode_op(in_place)(r, k, v, w, u, s0)
    y, last, _ = forward_op(L, precisions, settings)(r, k, v, w, u, s0)
    return y, last


def _wkv_fwd(r, k, v, w, u, s0, config):
    y, last, states = forward_op(*config[:3])(r, k, v, w, u, s0)
    return (y, last), (r, k, v, w, u, states)


def _wkv_bwd(config, residuals, cotangents):
    r, k, v, w, u, states = residuals
    dy, dlast = cotangents
    return backward_op(*config[:3])(r, k, v, w, u, states, dy.astype(r.dtype), dlast.astype(jnp.float32))


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


@functools.partial(jax.jit, static_argnames=("settings", "in_place"))
def wkv(r, k, v, w, u, s0, *, settings=Settings(), in_place=False):
    """r, k, v, w: (B, T, H, N) of one float dtype; u: (H, N); s0: (B, H, N, N) float32 or None; settings: the
    engine's settings.Settings.

    Jitted: called eagerly, one cached program runs instead of a dozen dispatches; inside a caller's jit (or
    grad, vmap, shard_map) it is simply inlined. in_place: the step-by-step kernel writes the final state over s0's
    buffer (recurrent.py), for callers inside a jitted loop or with a donated state."""
    B, T, H, N = r.shape
    u = jnp.broadcast_to(jnp.asarray(u, jnp.float32)[None], (B, H, N))
    s0 = jnp.zeros((B, H, N, N), jnp.float32) if s0 is None else jnp.asarray(s0, jnp.float32)
    config = (settings.chunk_length(T), precisions(r.dtype, settings.low_precision), settings, in_place)
    return _wkv(r, k, v, w, u, s0, config)


@functools.partial(jax.jit, static_argnames=("settings", "in_place"))
def decode(r, k, v, w, u, s0, *, settings=Settings(), in_place=False):
    """wkv of one token on (B, 1, C) inputs, the heads given by u (H, N): y (B, 1, C) and the final state. One jitted
    program with the reshapes, for eager callers."""
    B, T, C = r.shape
    H, N = u.shape
    y, state = wkv(*(x.reshape(B, T, H, N) for x in (r, k, v, w)), u, s0, settings=settings, in_place=in_place)
    return y.reshape(B, T, C), state
