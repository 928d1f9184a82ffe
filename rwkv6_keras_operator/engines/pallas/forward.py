"""The forward chunk kernel: the outputs (docs/math.md, "Chunks").

One program per (chunk c, head h, row b) reads its L x N tiles straight from the (B, T, H, N) arrays (rows past T
are masked: zero inputs and g = 0, so padding changes nothing) and the state at its chunk's start S_c (scan.py):

    y_t = sum_{s<t} A[t, s] v_s + bonus_t v_t + (r_t * exp(pre_t)) . S_c

with A from the binary tree of levels (levels.pair_scores). Key and value dimensions are cut into blocks of at most
64 (static loops), so N = 128 or 256 keeps the tiles small. Packed sequences: the chunk table (engines/packed.py)
gives each chunk's rows instead of c * L (common.rows_of); the math is the same, and the unused chunks at the
table's end do nothing.
"""
import functools

import jax

from . import common, masks
from .levels import bonus_scores, load_keys, pair_scores


def forward_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, states_ref, table_ref, levels_ref, y_ref, *, T, L, N,
                   precisions):
    # an unused chunk of packed sequences has no rows: nothing to write
    common.chunk_program(table_ref, functools.partial(_chunk_outputs, r_ref, k_ref, v_ref, w_ref, u_ref, states_ref,
                                                      table_ref, levels_ref, y_ref, T=T, L=L, N=N,
                                                      precisions=precisions))


def _chunk_outputs(r_ref, k_ref, v_ref, w_ref, u_ref, states_ref, table_ref, levels_ref, y_ref, c, h, b, *, T, L, N,
                   precisions):
    rows, valid = common.rows_of(c, L, T, table_ref)
    size, n = common.blocks(N)
    blocks, us, rq = [], [], []
    for i in range(n):
        kcols = common.ds(i * size, size)
        kb = load_keys(k_ref, w_ref, b, h, rows, valid, kcols, L, precisions, r_ref=r_ref, levels_ref=levels_ref)
        blocks.append(kb)
        us.append(common.load(u_ref.at[b, h, kcols])[None, :])
        rq.append(kb.r * kb.pre_factor())
    # (L, L), strictly lower; the levels unrolled up to L = 32 (faster there), a loop for longer chunks
    A = pair_scores(blocks, L, precisions.prec, unroll=L <= 32)
    bonus = bonus_scores(blocks, us)          # (L, 1)
    for j in range(n):
        vcols = common.ds(j * size, size)
        v = common.load(v_ref.at[b, rows, h, vcols], valid)
        y = common.mm(A, v, precisions.prec) + bonus * v
        for i in range(n):
            S = common.load(states_ref.at[b, h, c, common.ds(i * size, size), vcols])
            y = y + common.mm(rq[i], S, precisions.state_prec)
        common.store(y_ref.at[b, rows, h, vcols], y, valid)


def launch_forward(r, k, v, w, u, states, *, L, precisions, settings, table=None):
    """y (B, T, H, N) in r's dtype from the states at the chunk starts (B, H, NC, N, N); table: the (NC, 4) chunk
    table of packed sequences (B = 1), or None."""
    B, T, H, N = r.shape
    kernel = functools.partial(forward_kernel, T=T, L=L, N=N, precisions=precisions)
    return common.launch(
        kernel, (r, k, v, w, u, states, table, masks.level_table_for(settings, L)),
        grid=(common.num_chunks(T, L, table), H, B),
        num_warps=settings.chunk_warps(settings.forward_warps, N, r.dtype), num_stages=settings.forward_stages,
        name="wkv6_forward", out_shape=jax.ShapeDtypeStruct(r.shape, r.dtype),
    )
