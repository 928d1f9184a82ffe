"""The engine's three ops on per-row arrays, each a composition of kernel launches.

    forward(r, k, v, w, u, s0)                 -> y, final state, states at the chunk starts
    backward(r, k, v, w, u, starts, dy, dsT)   -> dr, dk, dv, dw, du, ds0
    decode(r, k, v, w, u, s0)                  -> y, final state          (step by step, short T)

r, k, v, w, dy: (B, T, H, N) of one dtype; u: (B, H, N) float32 (one row per batch row, so that folding
vmapped axes into B stays exact); s0, dsT: (B, H, N, N) float32. Every op maps (row, head) pairs
independently, which `sharding.parallel_op` turns into vmap and SPMD rules.
"""
import dataclasses
import functools

import jax.numpy as jnp

from .. import shared
from ..shared import Precision
from . import chunked, core, grads, recurrent, scan
from .sharding import parallel_op

X4 = "b t h n"
U = "b h n"
S = "b h n m"
STATES = "b h c n m"


def _forward(r, k, v, w, u, s0, *, L, precisions):
    starts, last = scan.states(k, v, w, s0, L=L, precisions=precisions)
    return chunked.output(r, k, v, w, u, starts, L=L, precisions=precisions), last, starts


def _backward(r, k, v, w, u, starts, dy, dsT, *, L, precisions):
    dends, ds0 = scan.states(r, dy, w, dsT, L=L, precisions=precisions, reverse=True)
    dr, dk, dv, dw, du = grads.grads(r, k, v, w, u, dy, starts, dends, L=L, precisions=precisions)
    return dr, dk, dv, dw, du.sum(axis=2), ds0


def _decode(r, k, v, w, u, s0):
    return recurrent.recurrent(r, k, v, w, u, s0)


@functools.lru_cache(maxsize=None)
def forward(L, precisions):
    return parallel_op(functools.partial(_forward, L=L, precisions=precisions), (X4, X4, X4, X4, U, S), (X4, S, STATES))


@functools.lru_cache(maxsize=None)
def backward(L, precisions):
    return parallel_op(functools.partial(_backward, L=L, precisions=precisions),
                       (X4, X4, X4, X4, U, STATES, X4, S), (X4, X4, X4, X4, U, S))


@functools.lru_cache(maxsize=None)
def decode():
    return parallel_op(_decode, (X4, X4, X4, X4, U, S), (X4, S))


def chunk_length(T, chunk):
    """Chunk length: `chunk` (a power of two >= 16), or the power of two >= T when T is shorter, at least 16 (the
    smallest side of a tile product)."""
    return shared.chunk_length(T, chunk, 16)


def precisions(dtype, low_precision):
    """The shared.Precisions of the kernels for inputs of `dtype`; in the interpreter, float32 inputs get exact float32
    products (IEEE)."""
    p = shared.precisions(jnp.dtype(dtype).name, low_precision)
    if p.prec is Precision.TF32X3 and core.interpret():
        p = dataclasses.replace(p, prec=Precision.IEEE, state_prec=Precision.IEEE)
    return p
