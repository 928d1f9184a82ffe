"""The inside of one chunk, as in-kernel math on tiles (docs/math.md, "Chunks" and "The binary tree").

A chunk holds L = 2^K positions. For one key block of it, `ChunkKeys` keeps r, k (L x BK, float32) and
g = log-decay (L x BK, float32, 0 on padding rows, so padding never decays anything). Every decay factor
is exp of a direct sum of g over a contiguous range (`core.masked_sum`), so every factor is <= 1 and exact
to a few ulps (rules 1 and 3):

    level h:  pre_h(t) = sum of g over t's h-block before t,   suf_h(s) = ... after s
              W[t, s] = exp(pre_h(t)) * exp(suf_h(s))   for the pairs split at level h (rule 2)
    chunk:    pre(t)   = sum_{m<t} g_m,   suf(s) = sum_{m>s} g_m,   tot = sum_m g_m

The score matrix A[t, s] = sum_i r_t[i] k_s[i] W[t, s, i] (s < t) is the sum over levels of the masked
products (r * exp(pre_h)) (k * exp(suf_h))^T; the backward uses the same factors transposed.
"""
import jax.numpy as jnp

from . import core


class ChunkKeys:
    """r, k, g of one key block of one chunk, with the decay factors built on demand."""

    def __init__(self, r, k, g, L):
        self.r, self.k, self.g, self.L = r, k, g, L
        self.parts = core.split3(g)

    def level(self, h):
        """exp(pre_h), exp(suf_h): (L, BK) tiles, or (None, None) at h = 1 where both are empty products."""
        if h == 1:
            return None, None
        pre = core.masked_sum(core.before_mask(self.L, h), self.parts)
        suf = core.masked_sum(core.after_mask(self.L, h), self.parts)
        return jnp.exp(pre), jnp.exp(suf)

    def chunk_pre(self):
        """exp(sum_{m<t} g_m): the decay from the chunk start to just before t."""
        return jnp.exp(core.masked_sum(core.before_mask(self.L, self.L), self.parts))

    def chunk_suf(self):
        """exp(sum_{m>s} g_m): the decay from just after s to the chunk end."""
        return jnp.exp(core.masked_sum(core.after_mask(self.L, self.L), self.parts))

    def chunk_tot(self):
        """exp(sum_m g_m) as a (1, BK) row: the decay over the whole chunk."""
        return jnp.exp(jnp.sum(self.g, axis=0, keepdims=True))


def scaled(x, factor):
    return x if factor is None else x * factor


def scores(blocks, L, prec):
    """A[t, s] = sum_i r_t k_s W[t, s] for s < t (0 elsewhere), summed over the key blocks."""
    A = None
    for h in core.levels(L):
        level = None
        for kb in blocks:
            e_pre, e_suf = kb.level(h)
            part = core.mm(scaled(kb.r, e_pre), scaled(kb.k, e_suf), prec, tb=True)
            level = part if level is None else level + part
        level = jnp.where(core.pair_mask(L, h), level, 0.0)
        A = level if A is None else A + level
    return A


def bonus(blocks, us):
    """sum_i r_t[i] u[i] k_t[i]: the diagonal t = s, as an (L, 1) column (exact, element-wise)."""
    out = None
    for kb, u in zip(blocks, us):
        part = jnp.sum(kb.r * u * kb.k, axis=1, keepdims=True)
        out = part if out is None else out + part
    return out


def score_grads(kb, dA, L, prec):
    """The intra-chunk parts of dr and dk for one key block, given dA[t, s] = dy_t . v_s.

    dr_t = sum_{s<t} dA[t, s] k_s * W[t, s],   dk_s = sum_{t>s} dA[t, s] r_t * W[t, s]
    computed level by level with the same factors as `scores`.
    """
    dr = dk = None
    for h in core.levels(L):
        e_pre, e_suf = kb.level(h)
        dA_h = jnp.where(core.pair_mask(L, h), dA, 0.0)
        part_r = scaled(core.mm(dA_h, scaled(kb.k, e_suf), prec), e_pre)
        part_k = scaled(core.mm(dA_h, scaled(kb.r, e_pre), prec, ta=True), e_suf)
        dr = part_r if dr is None else dr + part_r
        dk = part_k if dk is None else dk + part_k
    return dr, dk
