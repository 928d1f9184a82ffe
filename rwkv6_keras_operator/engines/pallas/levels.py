"""The inside of one chunk, as in-kernel math on tiles (docs/math.md, "Chunks" and "The binary tree").

A chunk holds L = 2^K positions. For one key block of it, `ChunkKeys` keeps r, k (L x BK, float32) and
g = log-decay (L x BK, float32, 0 on padding rows, so padding never decays anything). Every decay factor
is exp of a direct sum of g over a contiguous range (masks.masked_sum), so every factor is <= 1 and exact
to a few ulps (rules 1 and 3):

    level h:  pre_h(t) = sum of g over t's h-block before t,   suf_h(s) = ... after s
              W[t, s] = exp(pre_h(t)) * exp(suf_h(s))   for the pairs split at level h (rule 2)
    chunk:    pre(t)   = sum_{m<t} g_m,   suf(s) = sum_{m>s} g_m,   tot = sum_m g_m

A position is the later member t of a level's pairs where it lies in a lower half and the earlier member s where
it lies in an upper half, never both: one tile F_h holds exp(pre_h) on lower and exp(suf_h) on upper halves. The
score matrix A[t, s] = sum_i r_t[i] k_s[i] W[t, s, i] (s < t) is the sum over levels of the masked products
(r * F_h) (k * F_h)^T; the backward uses the same factors transposed.
"""
import jax.numpy as jnp
from jax import lax

from . import common, masks


class ChunkKeys:
    """r, k, g of one key block of one chunk, with the decay factors built on demand."""

    def __init__(self, r, k, g, L, precisions, levels_ref=None):
        self.r, self.k, self.g, self.L = r, k, g, L
        self.levels_ref = levels_ref   # the level table (masks.level_table, Settings.mask_table) or None
        self.mask_prec = precisions.mask_prec
        self.parts = masks.bf16_pieces(g, precisions.pieces)   # the bits of g its decay sums use

    def level_factor(self, shift):
        """F_h for h = 2**shift >= 2 (L, BK): exp(pre_h) on lower-half rows, exp(suf_h) on upper-half rows."""
        return common.exp(masks.masked_sum(masks.level_mask(self.L, shift, masks.FACTOR, self.levels_ref), self.parts,
                                           self.mask_prec))

    def pre_factor(self):
        """exp(sum_{m<t} g_m): the decay from the chunk start to just before t."""
        return common.exp(masks.masked_sum(masks.before_mask(self.L, masks.log2(self.L)), self.parts, self.mask_prec))

    def suf_factor(self):
        """exp(sum_{m>s} g_m): the decay from just after s to the chunk end."""
        return common.exp(masks.masked_sum(masks.after_mask(self.L, masks.log2(self.L)), self.parts, self.mask_prec))

    def state_rows(self, reverse):
        """The key rows as they enter the chunk's state term X = (k * decay)^T val: decayed to the chunk's end
        (forward: suf_factor), or from its start (backward, key = r: pre_factor)."""
        return self.k * (self.pre_factor() if reverse else self.suf_factor())

    def tot_factor(self):
        """exp(sum_m g_m) as a (1, BK) row: the decay over the whole chunk."""
        return common.exp(jnp.sum(self.g, axis=0, keepdims=True))


def load_keys(k_ref, w_ref, b, h, rows, valid, cols, L, precisions, r_ref=None, levels_ref=None):
    """ChunkKeys for one key block: k rows (and r rows if given), g = 0 on padding rows; levels_ref: the level table
    its level factors read, or None."""
    key = common.load(k_ref.at[b, rows, h, cols], valid)
    g = jnp.where(valid, common.log_decay(common.load(w_ref.at[b, rows, h, cols], valid)), 0.0)
    r = key if r_ref is None else common.load(r_ref.at[b, rows, h, cols], valid)
    return ChunkKeys(r, key, g, L, precisions, levels_ref)


def level_loop(L, body, carry, unroll):
    """carry = body(shift, carry) for the levels h = 2**shift = 2, 4, ..., L/2, unrolled or as a loop.

    Level h = 1 (pairs of neighbours, W = 1: no decay between them) is left to the callers.
    """
    K = masks.log2(L)
    if unroll:
        for shift in range(1, K):
            carry = body(shift, carry)
        return carry
    return lax.fori_loop(1, K, body, carry) if K > 1 else carry


def pair_scores(blocks, L, prec, unroll=True):
    """A[t, s] = sum_i r_t k_s W[t, s] for s < t (0 elsewhere), summed over the key blocks; products at `prec`."""
    A = None
    for kb in blocks:
        A = common.add(A, common.mm(kb.r, kb.k, prec, tb=True))
    A = jnp.where(masks.pair_mask(L, 0), A, 0.0)

    def level(shift, A):
        acc = None
        for kb in blocks:
            F = kb.level_factor(shift)
            acc = common.add(acc, common.mm(kb.r * F, kb.k * F, prec, tb=True))
        return A + jnp.where(masks.pair_mask(L, shift), acc, 0.0)

    return level_loop(L, level, A, unroll)



def pair_grads(kb, dA, A, precisions):
    """The pairs' parts of the backward for one key block, level by level, with dA[t, s] = dy_t . v_s (L x L):

        A[t, s]   (added to A, the sum over the key blocks before this one; for dv)
        dr[t] = sum_{s<t} dA[t, s] k_s W[t, s],     dk[s] = sum_{t>s} dA[t, s] r_t W[t, s]
        dg[m] = sum over levels h of the level's terms r_t dr^h[t] (t > m) and k_s dk^h[s] (s < m) that span m

    Every pair's term enters dg only at the positions m it really spans (masks.span_mask), so nothing cancels.
    Returns (A, dr, dk, dg)."""
    L, prec = kb.L, precisions.prec
    # Level h = 1: neighbours, W = 1, no position between them (no dg part).
    pairs = masks.pair_mask(L, 0)
    dA_h = jnp.where(pairs, dA, 0.0)
    A = common.add(A, jnp.where(pairs, common.mm(kb.r, kb.k, prec, tb=True), 0.0))
    carry = (A, common.mm(dA_h, kb.k, prec), common.mm(dA_h, kb.r, prec, ta=True), jnp.zeros_like(kb.g))

    def level(shift, carry):
        # The pairs of level h = 2**shift: A (for dv) and the pair parts of dr, dk, dg share the factors.
        A, dr, dk, dg = carry
        pairs = masks.pair_mask(L, shift)
        dA_h = jnp.where(pairs, dA, 0.0)
        F = kb.level_factor(shift)                   # pre_h on the rows t, suf_h on the rows s
        rq, kq = kb.r * F, kb.k * F
        A = A + jnp.where(pairs, common.mm(rq, kq, prec, tb=True), 0.0)
        part_r = common.mm(dA_h, kq, prec) * F            # non-zero on lower halves only (rows t)
        part_k = common.mm(dA_h, rq, prec, ta=True) * F   # on upper halves only (rows s)
        # r * part_r lives on lower halves, k * part_k on upper halves: one masked sum takes both.
        dg = dg + masks.masked_sum(masks.level_mask(L, shift, masks.SPAN, kb.levels_ref),
                                   masks.bf16_pieces(kb.r * part_r + kb.k * part_k, precisions.dg_pieces),
                                   precisions.mask_prec)
        return A, dr + part_r, dk + part_k, dg

    return level_loop(L, level, carry, unroll=False)


def bonus_scores(blocks, us):
    """A[t, t] = sum_i r_t[i] u[i] k_t[i]: the diagonal t = s (the bonus), as an (L, 1) column (exact, element-wise)."""
    out = None
    for kb, u in zip(blocks, us):
        out = common.add(out, jnp.sum(kb.r * u * kb.k, axis=1, keepdims=True))
    return out
