"""The state scan across chunks, the only sequential part of the chunked engine (docs/math.md, "Chunks").

    forward  (reverse=False):  states[c] = S;  S <- tot_c * S + X_c   for c = 0, 1, ..., nc-1   (S starts at init)
    backward (reverse=True):   states[c] = S;  S <- tot_c * S + X_c   for c = nc-1, ..., 0       (S starts at init)

tot_c (a column over keys: exp of the sum of g over chunk c) scales the rows of S; X_c = sum over the chunk's rows of
(a * decay) b^T, with a, b = k, v forward (decay: to the chunk's end) and r, dy backward (from its start).
Forward, init is s0, states[c] the state at the start of chunk c and the last S the state after the last step;
backward, init is the gradient of the final state, states[c] the gradient of the state at the end of chunk c and
the last S the gradient of s0. `launch_scan` picks one of two ways:

    enough programs (rows x heads x state blocks >= settings.state_scan_min_programs; below
        settings.state_scan_narrow_below the key blocks narrow to settings.state_scan_keys_few rows): one kernel
        (state_scan_kernel) that builds X_c and tot_c from the chunk's own rows as it goes (levels.ChunkKeys), so X
        never goes through memory, its loads pipelined ahead of the chain (settings.state_scan_stages);
    fewer (short inputs, few rows and heads): state_terms builds every X_c at once (in parallel over chunks), then
        scan_terms carries S through them; its loads do not depend on S, so they pipeline, and the sequential steps
        stay short.

Packed sequences (B = 1; binding.wkv_varlen): the chunk kernel state_terms reads each chunk's rows from the chunk
table (engines/packed.py), and the scans run one program per sequence instead of one per row, each over its own
chunks (first_chunk ... first_chunk + ceil(len / L) - 1, rows from its first token, none past its last), from
init[sequence] to last[sequence] (n, H, N, N): the start states and final states forward, the gradients of the final
and start states backward. The sequences' chunks are independent, so the longest sequence, not the whole row, is the
sequential path; a sequence without tokens has no chunk, and its last is its init. The chunks past the used ones
(the table's bound) belong to no sequence: their states are never written, and the chunk kernels mask all their rows.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import packed
from . import common
from .levels import load_keys

# the columns of the sequence table of packed sequences: (n, 3) int32, one row a sequence
SEQ_START, SEQ_END, SEQ_FIRST_CHUNK = range(3)


def sequence_table(cu_seqlens, L):
    """(n, 3) int32: each sequence's first token, the token after its last, and its first chunk in the chunk table
    (engines/packed.py lays the ceil(len / L) chunks of the sequences side by side, in order)."""
    starts, ends, chunk_cu = packed.sequence_chunks(cu_seqlens, L)
    return jnp.stack([starts, ends, chunk_cu[:-1]], axis=1)


def scan_range(b, NC, L, sequences_ref):
    """What the scan program of row b (packed: of sequence b) runs through: the row of the inputs it reads, its
    number of chunks, and the index of its i-th chunk (in the states and the chunk table)."""
    if sequences_ref is None:
        return b, NC, lambda i: i
    t0, t_end = sequences_ref[b, SEQ_START], sequences_ref[b, SEQ_END]
    c0 = sequences_ref[b, SEQ_FIRST_CHUNK]
    # row 0 as an array: the interpreter takes no Python int as an index of a load inside a loop
    return jnp.int32(0), (t_end - t0 + (L - 1)) // L, lambda i: c0 + i


def state_terms_kernel(a_ref, b_ref, w_ref, table_ref, x_ref, tot_ref, *, T, L, N, precisions, reverse):
    # an unused chunk of packed sequences: no scan reads its terms
    common.chunk_program(table_ref, functools.partial(_chunk_terms, a_ref, b_ref, w_ref, table_ref, x_ref, tot_ref,
                                                      T=T, L=L, N=N, precisions=precisions, reverse=reverse))


def _chunk_terms(a_ref, b_ref, w_ref, table_ref, x_ref, tot_ref, c, h, b, *, T, L, N, precisions, reverse):
    rows, valid = common.rows_of(c, L, T, table_ref)
    size, n = common.blocks(N)
    for i in range(n):
        kcols = common.ds(i * size, size)
        kb = load_keys(a_ref, w_ref, b, h, rows, valid, kcols, L, precisions)
        common.store(tot_ref.at[b, h, c, kcols], kb.tot_factor()[0])
        aq = kb.state_rows(reverse)
        for j in range(n):
            vcols = common.ds(j * size, size)
            bm = common.load(b_ref.at[b, rows, h, vcols], valid)
            common.store(x_ref.at[b, h, c, kcols, vcols], common.mm(aq, bm, precisions.state_prec, ta=True))


def state_terms(a, b, w, *, L, precisions, settings, reverse=False, table=None):
    """X (B, H, NC, N, N) and tot (B, H, NC, N), float32, for the scan over chunks."""
    B, T, H, N = a.shape
    NC = common.num_chunks(T, L, table)
    kernel = functools.partial(state_terms_kernel, T=T, L=L, N=N, precisions=precisions, reverse=reverse)
    return common.launch(
        kernel, (a, b, w, table), grid=(NC, H, B), num_warps=settings.state_terms_warps, num_stages=2,
        name="wkv6_state_terms",
        out_shape=(jax.ShapeDtypeStruct((B, H, NC, N, N), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, NC, N), jnp.float32)),
    )


def scan_terms_kernel(x_ref, tot_ref, init_ref, sequences_ref, states_ref, last_ref, *, L, NC, BV, reverse):
    j, h, b = common.program_id(0), common.program_id(1), common.program_id(2)
    vcols = common.ds(j * BV, BV)
    row, count, chunk = scan_range(b, NC, L, sequences_ref)

    def step(i, S):
        c = chunk(count - 1 - i if reverse else i)
        X = common.load(x_ref.at[row, h, c, :, vcols])
        tot = common.load(tot_ref.at[row, h, c, :])[:, None]
        common.store(states_ref.at[row, h, c, :, vcols], S)
        return tot * S + X

    S = lax.fori_loop(0, count, step, common.load(init_ref.at[b, h, :, vcols]))
    common.store(last_ref.at[b, h, :, vcols], S)


def scan_terms(X, tot, init, *, L, precisions, settings, reverse=False, sequences=None):
    """states (B, H, NC, N, N) in precisions.states_dtype and the last (B, H, N, N) float32 (packed: with the
    sequence table, init and last (n, H, N, N), per sequence)."""
    B, H, NC, N, _ = X.shape
    BV = min(settings.scan_terms_block, N)
    kernel = functools.partial(scan_terms_kernel, L=L, NC=NC, BV=BV, reverse=reverse)
    return common.launch(
        kernel, (X, tot, init, sequences), grid=(N // BV, H, init.shape[0]), num_warps=settings.scan_terms_warps,
        num_stages=3, name="wkv6_scan",
        out_shape=(jax.ShapeDtypeStruct(X.shape, precisions.states_dtype),
                   jax.ShapeDtypeStruct(init.shape, jnp.float32)),
    )


def state_scan_kernel(a_ref, b_ref, w_ref, init_ref, table_ref, sequences_ref, states_ref, last_ref, *, T, L, NC, N,
                      BK, BV, precisions, reverse):
    j, h, b = common.program_id(0), common.program_id(1), common.program_id(2)
    kcols = common.ds((j // (N // BV)) * BK, BK)
    vcols = common.ds((j % (N // BV)) * BV, BV)
    row, count, chunk = scan_range(b, NC, L, sequences_ref)

    def step(i, S):
        c = chunk(count - 1 - i if reverse else i)
        rows, valid = common.rows_of(c, L, T, table_ref)
        kb = load_keys(a_ref, w_ref, row, h, rows, valid, kcols, L, precisions)
        bm = common.load(b_ref.at[row, rows, h, vcols], valid)
        common.store(states_ref.at[row, h, c, kcols, vcols], S)
        return kb.tot_factor()[0][:, None] * S + common.mm(kb.state_rows(reverse), bm, precisions.state_prec, ta=True)

    S = lax.fori_loop(0, count, step, common.load(init_ref.at[b, h, kcols, vcols]))
    common.store(last_ref.at[b, h, kcols, vcols], S)


def launch_scan(a, b, w, init, *, L, precisions, settings, reverse=False, table=None):
    """states (B, H, NC, N, N) in precisions.states_dtype and the last (B, H, N, N) float32 of the scan whose
    X_c = sum over the chunk's rows of (a * decay) b^T (decay: to the chunk's end forward, from its start
    backward) and tot_c = exp(sum of g over the chunk); a, b = k, v forward and r, dy backward.
    Packed sequences (B = 1): table, the pair (chunk table (NC, 4), sequence table (n, 3)); init and last are then
    (n, H, N, N), per sequence."""
    B, T, H, N = a.shape
    chunks, sequences = table if table is not None else (None, None)
    NC = common.num_chunks(T, L, chunks)
    BV = min(settings.state_scan_block, N)

    def programs(BK):
        return init.shape[0] * H * (N // BK) * (N // BV)

    BK = common.blocks(N, settings.state_scan_keys)[0]
    if programs(BK) < settings.state_scan_narrow_below:   # few rows and heads: narrower key blocks, more programs
        BK = common.blocks(N, settings.state_scan_keys_few)[0]
    if programs(BK) < settings.state_scan_min_programs:
        X, tot = state_terms(a, b, w, L=L, precisions=precisions, settings=settings, reverse=reverse, table=chunks)
        return scan_terms(X, tot, init, L=L, precisions=precisions, settings=settings, reverse=reverse,
                          sequences=sequences)
    kernel = functools.partial(state_scan_kernel, T=T, L=L, NC=NC, N=N, BK=BK, BV=BV, precisions=precisions,
                               reverse=reverse)
    return common.launch(
        kernel, (a, b, w, init, chunks, sequences), grid=((N // BK) * (N // BV), H, init.shape[0]),
        num_warps=settings.state_scan_warps, num_stages=settings.state_scan_stages, name="wkv6_state_scan",
        out_shape=(jax.ShapeDtypeStruct((B, H, NC, N, N), precisions.states_dtype),
                   jax.ShapeDtypeStruct(init.shape, jnp.float32)),
    )
