"""The engine's three ops on per-row arrays, each a composition of kernel launches.

    forward(r, k, v, w, u, s0)                 -> y, final state, states at the chunk starts
    backward(r, k, v, w, u, starts, dy, dsT)   -> dr, dk, dv, dw, du, ds0
    decode(r, k, v, w, u, s0)                  -> y, final state          (step by step, short T; in_place:
                                                                          written over s0)

r, k, v, w, dy: (B, T, H, N) of one dtype; u: (B, H, N) float32 (one row per batch row, so that folding
vmapped axes into B stays exact); s0, dsT: (B, H, N, N) float32. Every op maps (row, head) pairs
independently, which `sharding.parallel_op` turns into vmap and SPMD rules.
"""
import functools

from . import chunked, core, grads, recurrent, scan
from .sharding import parallel_op

X4 = "b t h n"
U = "b h n"
S = "b h n m"
STATES = "b h c n m"


def _forward(r, k, v, w, u, s0, *, L, prec):
    starts, last = scan.states(k, v, w, s0, L=L, prec=prec)
    return chunked.output(r, k, v, w, u, starts, L=L, prec=prec), last, starts


def _backward(r, k, v, w, u, starts, dy, dsT, *, L, prec):
    dends, ds0 = scan.states(r, dy, w, dsT, L=L, prec=prec, reverse=True)
    dr, dk, dv, dw, du = grads.grads(r, k, v, w, u, dy, starts, dends, L=L, prec=prec)
    return dr, dk, dv, dw, du.sum(axis=2), ds0


def _decode(r, k, v, w, u, s0, *, in_place):
    return recurrent.recurrent(r, k, v, w, u, s0, in_place=in_place)


@functools.lru_cache(maxsize=None)
def forward(L, prec):
    return parallel_op(functools.partial(_forward, L=L, prec=prec), (X4, X4, X4, X4, U, S), (X4, S, STATES))


@functools.lru_cache(maxsize=None)
def backward(L, prec):
    return parallel_op(functools.partial(_backward, L=L, prec=prec),
                       (X4, X4, X4, X4, U, STATES, X4, S), (X4, X4, X4, X4, U, S))


@functools.lru_cache(maxsize=None)
def decode(in_place=False):
    return parallel_op(functools.partial(_decode, in_place=in_place), (X4, X4, X4, X4, U, S), (X4, S))


def chunk_length(T, chunk):
    """Chunk length: `chunk` (a power of two >= 16), or the power of two >= T when T is shorter."""
    L = 16
    while L < min(T, chunk):
        L *= 2
    return L


def precision(dtype, mode=None):
    return core.resolve_prec(dtype, mode)
