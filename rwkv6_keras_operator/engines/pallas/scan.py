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

Packed sequences (a chunk table, engines/packed.py; B = 1): the chunks' rows come from the table and the scan
restarts per sequence. Where the scan enters a sequence (forward: its first chunk; backward: its last) S is set to
init[sequence] (init (n, H, N, N): the start states forward, the gradients of the final states backward); where it
leaves one (forward: after its last chunk; backward: after its first) S is written to last[sequence] (n, H, N, N):
the final state forward, the gradient of the start state backward. A sequence without chunks is left unwritten
(its final state is its start state: binding.py). Unused chunks (no rows: tot = 1, X = 0, neither first nor last)
leave S as it is.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import packed
from . import common
from .levels import load_keys


def sequence_bounds(table_ref, c, reverse):
    """Packed sequences: chunk c's sequence, and whether the scan enters / leaves that sequence at c."""
    flags = table_ref[c, packed.FLAGS]
    enters, leaves = (packed.LAST, packed.FIRST) if reverse else (packed.FIRST, packed.LAST)
    return table_ref[c, packed.SEQUENCE], (flags & enters) != 0, (flags & leaves) != 0


def enter_sequence(S, init_ref, table_ref, c, h, kcols, vcols, reverse):
    """S, or init[sequence] where the scan enters chunk c's sequence at c (loaded only there)."""
    sequence, enters, _ = sequence_bounds(table_ref, c, reverse)
    start = common.load(init_ref.at[sequence, h, kcols, vcols], jnp.broadcast_to(enters, S.shape))
    return jnp.where(enters, start, S)


def leave_sequence(S, last_ref, table_ref, c, h, kcols, vcols, reverse):
    """Writes S (the state after chunk c) to last[sequence] where the scan leaves chunk c's sequence at c."""
    sequence, _, leaves = sequence_bounds(table_ref, c, reverse)
    common.store(last_ref.at[sequence, h, kcols, vcols], S, jnp.broadcast_to(leaves, S.shape))


def state_terms_kernel(a_ref, b_ref, w_ref, table_ref, x_ref, tot_ref, *, T, L, N, precisions, reverse):
    c, rows, valid = common.chunk_rows(L, T, table_ref)
    h, b = common.program_id(1), common.program_id(2)
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


def scan_terms_kernel(x_ref, tot_ref, init_ref, table_ref, states_ref, last_ref, *, NC, BV, reverse):
    j, h, b = common.program_id(0), common.program_id(1), common.program_id(2)
    vcols = common.ds(j * BV, BV)
    kcols = slice(None)

    def step(i, S):
        c = NC - 1 - i if reverse else i
        if table_ref is not None:
            S = enter_sequence(S, init_ref, table_ref, c, h, kcols, vcols, reverse)
        X = common.load(x_ref.at[b, h, c, :, vcols])
        tot = common.load(tot_ref.at[b, h, c, :])[:, None]
        common.store(states_ref.at[b, h, c, :, vcols], S)
        S = tot * S + X
        if table_ref is not None:
            leave_sequence(S, last_ref, table_ref, c, h, kcols, vcols, reverse)
        return S

    if table_ref is None:
        S = lax.fori_loop(0, NC, step, common.load(init_ref.at[b, h, :, vcols]))
        common.store(last_ref.at[b, h, :, vcols], S)
    else:
        lax.fori_loop(0, NC, step, jnp.zeros((init_ref.shape[2], BV), jnp.float32))


def scan_terms(X, tot, init, *, precisions, settings, reverse=False, table=None):
    """states (B, H, NC, N, N) in precisions.states_dtype and the last (B, H, N, N) float32 (packed: (n, H, N, N),
    per sequence)."""
    B, H, NC, N, _ = X.shape
    BV = min(settings.scan_terms_block, N)
    kernel = functools.partial(scan_terms_kernel, NC=NC, BV=BV, reverse=reverse)
    return common.launch(
        kernel, (X, tot, init, table), grid=(N // BV, H, B), num_warps=settings.scan_terms_warps, num_stages=3,
        name="wkv6_scan",
        out_shape=(jax.ShapeDtypeStruct(X.shape, precisions.states_dtype),
                   jax.ShapeDtypeStruct(init.shape, jnp.float32)),
    )


def state_scan_kernel(a_ref, b_ref, w_ref, init_ref, table_ref, states_ref, last_ref, *, T, L, NC, N, BK, BV,
                      precisions, reverse):
    j, h, b = common.program_id(0), common.program_id(1), common.program_id(2)
    kcols = common.ds((j // (N // BV)) * BK, BK)
    vcols = common.ds((j % (N // BV)) * BV, BV)

    def step(i, S):
        c = NC - 1 - i if reverse else i
        if table_ref is not None:
            S = enter_sequence(S, init_ref, table_ref, c, h, kcols, vcols, reverse)
        rows, valid = common.rows_of(c, L, T, table_ref)
        kb = load_keys(a_ref, w_ref, b, h, rows, valid, kcols, L, precisions)
        bm = common.load(b_ref.at[b, rows, h, vcols], valid)
        common.store(states_ref.at[b, h, c, kcols, vcols], S)
        S = kb.tot_factor()[0][:, None] * S + common.mm(kb.state_rows(reverse), bm, precisions.state_prec, ta=True)
        if table_ref is not None:
            leave_sequence(S, last_ref, table_ref, c, h, kcols, vcols, reverse)
        return S

    if table_ref is None:
        S = lax.fori_loop(0, NC, step, common.load(init_ref.at[b, h, kcols, vcols]))
        common.store(last_ref.at[b, h, kcols, vcols], S)
    else:
        lax.fori_loop(0, NC, step, jnp.zeros((BK, BV), jnp.float32))


def launch_scan(a, b, w, init, *, L, precisions, settings, reverse=False, table=None):
    """states (B, H, NC, N, N) in precisions.states_dtype and the last (B, H, N, N) float32 of the scan whose
    X_c = sum over the chunk's rows of (a * decay) b^T (decay: to the chunk's end forward, from its start
    backward) and tot_c = exp(sum of g over the chunk); a, b = k, v forward and r, dy backward.
    table: the (NC, 4) chunk table of packed sequences (B = 1); init and last are then (n, H, N, N), per sequence."""
    B, T, H, N = a.shape
    NC = common.num_chunks(T, L, table)
    BV = min(settings.state_scan_block, N)

    def programs(BK):
        return B * H * (N // BK) * (N // BV)

    BK = common.blocks(N, settings.state_scan_keys)[0]
    if programs(BK) < settings.state_scan_narrow_below:   # few rows and heads: narrower key blocks, more programs
        BK = common.blocks(N, settings.state_scan_keys_few)[0]
    if programs(BK) < settings.state_scan_min_programs:
        X, tot = state_terms(a, b, w, L=L, precisions=precisions, settings=settings, reverse=reverse, table=table)
        return scan_terms(X, tot, init, precisions=precisions, settings=settings, reverse=reverse, table=table)
    kernel = functools.partial(state_scan_kernel, T=T, L=L, NC=NC, N=N, BK=BK, BV=BV, precisions=precisions,
                               reverse=reverse)
    return common.launch(
        kernel, (a, b, w, init, table), grid=((N // BK) * (N // BV), H, B), num_warps=settings.state_scan_warps,
        num_stages=settings.state_scan_stages, name="wkv6_state_scan",
        out_shape=(jax.ShapeDtypeStruct((B, H, NC, N, N), precisions.states_dtype),
                   jax.ShapeDtypeStruct(init.shape, jnp.float32)),
    )
