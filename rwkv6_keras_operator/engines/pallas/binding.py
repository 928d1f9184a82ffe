"""The kernels bound to jax: the engine's ops as compositions of kernel launches, and one `jax.custom_vjp`.

    forward_op(r, k, v, w, u, s0)                 -> y, final state, states (the state at every chunk start)
    backward_op(r, k, v, w, u, states, dy, dsT)   -> dr, dk, dv, dw, du, ds0
    decode_op(r, k, v, w, u, s0)                  -> y, final state          (step by step, short T; in_place:
                                                                             written over s0)
    forward_varlen_op(r, k, v, w, u, s0, chunks, sequences)     -> y, final states, states
    backward_varlen_op(r, k, v, w, u, states, dy, dfinals, chunks, sequences) -> dr, dk, dv, dw, du, ds0
        packed sequences, B = 1: chunks the chunk table of engines/packed.py, sequences scan.sequence_table; s0,
        the final states, dfinals and ds0 (n, H, N, N), one a sequence

r, k, v, w, dy: (B, T, H, N) of one dtype; u: (B, H, N) float32 (one row per batch row, so that folding vmapped
axes into B stays exact); s0, dsT: (B, H, N, N) float32. Every op maps (row, head) pairs independently, which
`sharding.parallel_op` turns into vmap and SPMD rules.

Forward without differentiation: the step-by-step kernel for T <= settings.decode_max_t, else the chunked ops. Under
differentiation the forward always runs chunked and keeps the states at the chunk starts ((B, H, nc, N, N), in
Precisions.states_dtype) for the backward, which rebuilds everything else inside each chunk.

Packed sequences (`wkv_varlen`) run the same kernels, always chunked, in a `jax.custom_vjp` of their own: the chunk
kernels on the chunks of the chunk table (engines/packed.py), the scans one program per sequence (scan.py). Their
ops have one row (B = 1) and per-sequence states, so the row and head rules of sharding.py do not apply: under vmap
they run once per vmapped element (`one_at_a_time_under_vmap`), and under SPMD jit they take their inputs whole
(XLA's default for a custom call).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import packed, shared
from ..shared import Precision
from . import backward, common, forward, recurrent, scan
from .settings import Settings
from .sharding import parallel_op

X4 = "b t h n"
U = "b h n"
S = "b h n m"
STATES = "b h c n m"


def forward_impl(r, k, v, w, u, s0, chunks=None, sequences=None, *, L, precisions, settings):
    table = None if chunks is None else (chunks, sequences)
    states, last = scan.launch_scan(k, v, w, s0, L=L, precisions=precisions, settings=settings, table=table)
    y = forward.launch_forward(r, k, v, w, u, states, L=L, precisions=precisions, settings=settings, table=chunks)
    return y, last, states


def backward_impl(r, k, v, w, u, states, dy, dsT, chunks=None, sequences=None, *, L, precisions, settings):
    table = None if chunks is None else (chunks, sequences)
    dstates, ds0 = scan.launch_scan(r, dy, w, dsT, L=L, precisions=precisions, settings=settings, reverse=True,
                                    table=table)
    dr, dk, dv, dw, du = backward.launch_backward(r, k, v, w, u, dy, states, dstates, L=L, precisions=precisions,
                                                  settings=settings, table=chunks)
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


def one_at_a_time_under_vmap(fn):
    """fn (whose arrays have no axis to fold a vmapped one into) as an op that vmap runs once per element of the
    vmapped axis, in a loop (jax.lax.map): correct for any vmapped argument, at the price of a launch per element."""
    @jax.custom_batching.custom_vmap
    def op(*args):
        return tuple(fn(*args))

    @op.def_vmap
    def _vmap(size, in_batched, *args):
        batched = [x for x, is_batched in zip(args, in_batched) if is_batched]

        def one(elements):
            elements = iter(elements)
            return op(*(next(elements) if is_batched else x for x, is_batched in zip(args, in_batched)))

        outs = jax.lax.map(one, batched)
        return outs, tuple(True for _ in outs)

    return op


@functools.lru_cache(maxsize=None)
def forward_varlen_op(L, precisions, settings):
    return one_at_a_time_under_vmap(functools.partial(forward_impl, L=L, precisions=precisions, settings=settings))


@functools.lru_cache(maxsize=None)
def backward_varlen_op(L, precisions, settings):
    return one_at_a_time_under_vmap(functools.partial(backward_impl, L=L, precisions=precisions, settings=settings))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _wkv_varlen(r, k, v, w, u, s0, chunks, sequences, config):
    y, finals, _ = forward_varlen_op(*config)(r, k, v, w, u, s0, chunks, sequences)
    return y, finals


def _wkv_varlen_fwd(r, k, v, w, u, s0, chunks, sequences, config):
    y, finals, states = forward_varlen_op(*config)(r, k, v, w, u, s0, chunks, sequences)
    return (y, finals), (r, k, v, w, u, states, chunks, sequences)


def _wkv_varlen_bwd(config, residuals, cotangents):
    r, k, v, w, u, states, chunks, sequences = residuals
    dy, dfinals = cotangents
    grads = backward_varlen_op(*config)(r, k, v, w, u, states, dy.astype(r.dtype), dfinals.astype(jnp.float32),
                                        chunks, sequences)
    return (*grads, None, None)


_wkv_varlen.defvjp(_wkv_varlen_fwd, _wkv_varlen_bwd)


@functools.partial(jax.jit, static_argnames=("settings",))
def wkv_varlen(r, k, v, w, u, s0, cu_seqlens, *, settings=Settings()):
    """Packed sequences: r, k, v, w (1, T, H, N) of one float dtype holding n sequences, cu_seqlens[i]:cu_seqlens[i + 1]
    ((n + 1,) int32, 0 = cu_seqlens[0] <= ... <= cu_seqlens[n] = T; not checked here: the operator does); u: (H, N);
    s0: (n, H, N, N) float32 start states or None (zeros). y (1, T, H, N) in r's dtype and the n final states
    (n, H, N, N) float32 (an empty sequence's is its start state: its scan has no chunk). Jitted, cu_seqlens traced:
    one program for every packing of T tokens into n sequences."""
    B, T, H, N = r.shape
    if B != 1:
        raise ValueError(f"wkv_varlen: packed sequences take r, k, v, w of batch size 1; got r of shape {r.shape}")
    n = cu_seqlens.shape[0] - 1
    L = settings.chunk_length(T)
    chunks = packed.chunk_table(cu_seqlens, T, n, L).packed
    u = jnp.asarray(u, jnp.float32)[None]
    s0 = jnp.zeros((n, H, N, N), jnp.float32) if s0 is None else jnp.asarray(s0, jnp.float32)
    config = (L, precisions(r.dtype, settings.low_precision), settings)
    return _wkv_varlen(r, k, v, w, u, s0, chunks, scan.sequence_table(cu_seqlens, L), config)


@functools.partial(jax.jit, static_argnames=("settings", "in_place"))
def decode(r, k, v, w, u, s0, *, settings=Settings(), in_place=False):
    """wkv of one token on (B, 1, C) inputs, the heads given by u (H, N): y (B, 1, C) and the final state. One jitted
    program with the reshapes, for eager callers."""
    B, T, C = r.shape
    H, N = u.shape
    y, state = wkv(*(x.reshape(B, T, H, N) for x in (r, k, v, w)), u, s0, settings=settings, in_place=in_place)
    return y.reshape(B, T, C), state
