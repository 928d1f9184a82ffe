"""The inside of one chunk, as in-kernel math on tiles (docs/math.md, "Chunks" and "The binary tree").

A chunk holds L = 2^K positions. For one key block of it, `ChunkKeys` keeps r, k (L x BK, float32) and
g = log-decay (L x BK, float32, 0 on padding rows, so padding never decays anything). Every decay factor
is exp of a direct sum of g over a contiguous range (`core.masked_sum`), so every factor is <= 1 and exact
to a few ulps (rules 1 and 3):

    level h:  pre_h(t) = sum of g over t's h-block before t,   suf_h(s) = ... after s
              W[t, s] = exp(pre_h(t)) * exp(suf_h(s))   for the pairs split at level h (rule 2)
    chunk:    pre(t)   = sum_{m<t} g_m,   suf(s) = sum_{m>s} g_m,   tot = sum_m g_m

A position is the later member t of a level's pairs where it lies in a lower half and the earlier member s where
it lies in an upper half, never both: one tile F_h holds exp(pre_h) on lower and exp(suf_h) on upper halves. The
score matrix A[t, s] = sum_i r_t[i] k_s[i] W[t, s, i] (s < t) is the sum over levels of the masked products
(r * F_h) (k * F_h)^T; the backward uses the same factors transposed.
"""
from jax import lax
import jax.numpy as jnp

from . import core


class ChunkKeys:
    """r, k, g of one key block of one chunk, with the decay factors built on demand."""

    def __init__(self, r, k, g, L, precisions):
        self.r, self.k, self.g, self.L = r, k, g, L
        self.mask_prec = precisions.mask_prec
        self.parts = core.split3(g, precisions.pieces)   # the bits of g its decay sums use

    def level(self, shift):
        """F_h for h = 2**shift >= 2 (L, BK): exp(pre_h) on lower-half rows, exp(suf_h) on upper-half rows."""
        return core.exp(core.masked_sum(core.level_mask(self.L, shift), self.parts, self.mask_prec))

    def chunk_pre(self):
        """exp(sum_{m<t} g_m): the decay from the chunk start to just before t."""
        return core.exp(core.masked_sum(core.before_mask(self.L, core.log2(self.L)), self.parts, self.mask_prec))

    def chunk_suf(self):
        """exp(sum_{m>s} g_m): the decay from just after s to the chunk end."""
        return core.exp(core.masked_sum(core.after_mask(self.L, core.log2(self.L)), self.parts, self.mask_prec))

    def state_rows(self, reverse):
        """The key rows as they enter the chunk's state term X = (k * decay)^T val: decayed to the chunk's end
        (forward: chunk_suf), or from its start (backward, key = r: chunk_pre)."""
        return self.k * (self.chunk_pre() if reverse else self.chunk_suf())

    def chunk_tot(self):
        """exp(sum_m g_m) as a (1, BK) row: the decay over the whole chunk."""
        return core.exp(jnp.sum(self.g, axis=0, keepdims=True))


def level_loop(L, body, carry, unroll):
    """carry = body(shift, carry) for the levels h = 2**shift = 2, 4, ..., L/2, unrolled or as a loop.

    Level h = 1 (pairs of neighbours, W = 1: no decay between them) is left to the callers.
    """
    K = core.log2(L)
    if unroll:
        for shift in range(1, K):
            carry = body(shift, carry)
        return carry
    return lax.fori_loop(1, K, body, carry) if K > 1 else carry


def scores(blocks, L, prec, unroll=True):
    """A[t, s] = sum_i r_t k_s W[t, s] for s < t (0 elsewhere), summed over the key blocks; products at `prec`."""
    A = None
    for kb in blocks:
        part = core.mm(kb.r, kb.k, prec, tb=True)
        A = part if A is None else A + part
    A = jnp.where(core.pair_mask(L, 0), A, 0.0)

    def level(shift, A):
        acc = None
        for kb in blocks:
            F = kb.level(shift)
            part = core.mm(kb.r * F, kb.k * F, prec, tb=True)
            acc = part if acc is None else acc + part
        return A + jnp.where(core.pair_mask(L, shift), acc, 0.0)

    return level_loop(L, level, A, unroll)


def bonus(blocks, us):
    """sum_i r_t[i] u[i] k_t[i]: the diagonal t = s, as an (L, 1) column (exact, element-wise)."""
    out = None
    for kb, u in zip(blocks, us):
        part = jnp.sum(kb.r * u * kb.k, axis=1, keepdims=True)
        out = part if out is None else out + part
    return out
