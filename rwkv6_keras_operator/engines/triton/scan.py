"""The state scan across chunks (docs/math.md, "Chunks" and "The backward pass").

Forward: S_{c+1} = diag(tot_c) S_c + sum_{s in c} (k_s * suf_s) v_s^T, from S_0 = s0 (or 0), chunk after chunk.
    Stores the start state of chunks 1 .. NC-1 (what the forward and backward kernels read) and the final state.
Backward: dS_{c-1} = diag(tot_c) dS_c + sum_{t in c} (r_t * pre_t) dy_t^T, from dS = dstate (or 0) at the end of
    the last chunk back to the first. Stores dS at the end of every chunk, and the gradient of s0.

Both are the same update, S <- diag(exp(g_tot)) S + (a * exp(g_decay))^T b, with g_tot the sum of g over the chunk
and (a, b, g_decay) = (k, v, the sums of g after each row) forward and (r, dy, the sums before each row) backward.
Every (i, j) entry of S evolves on its own, so a program owns a BK x BV tile of one head's state and walks the
chunks in order: the sequential part is one small matrix product per chunk.

Few heads and long sequences leave few programs with long chains; then the chunks are cut into G segments scanned
at once, each from zero (`state_scan_kernel`), and the update being linear, the true states follow:

    start of segment g:  S^g = diag(exp(log_g-1)) S^(g-1) + E_(g-1)      (`combine_kernel`, G steps; S^0 = s0)
    state after chunk c: S = local_c + diag(exp(cum_c)) S^g              (`fixup_kernel`)

with E_g the segment's own end state, log_g the direct sum of its chunks' tot and cum_c the direct sum of the tot
of the segment's chunks up to c (backward: the gradient at the end of chunk c, the chunks after c): sums of g <= 0, so
every factor is <= 1 (rule 1), and nothing is subtracted.
"""
import torch
import triton
import triton.language as tl

from .common import COUNT, START, exp, g_rows, head_base, load_rows, mm, precision_args, row_base
from .masks import after_mask, before_mask, column_sums, masked_sum


@triton.jit
def chunk_step(S, a_ptr, b_ptr, w_ptr, base, Tc, stride_t, kcols, vcols, L: tl.constexpr, LOG_L: tl.constexpr,
               BV: tl.constexpr, REVERSE: tl.constexpr, STATE_PREC: tl.constexpr, PIECES: tl.constexpr,
               MASK_PREC: tl.constexpr):
    """(S carried over the chunk of Tc rows (at most L) from `base`, the chunk's g_tot): the update of the module
    docstring."""
    idx = tl.arange(0, L)
    rows = idx
    a = load_rows(a_ptr, base, rows, Tc, kcols, stride_t)     # (L, BK)
    bm = load_rows(b_ptr, base, rows, Tc, vcols, stride_t)    # (L, BV)
    # the decay from each row to the chunk's end (forward: suf) or from its start (backward: pre), as direct
    # sums of g: masked products on the tensor cores (masks.masked_sum), not differences of running sums
    g = g_rows(w_ptr, base, rows, idx >= 0, Tc, kcols, stride_t)
    if REVERSE:
        g_decay = masked_sum(before_mask(L, LOG_L), g, PIECES, MASK_PREC)
    else:
        g_decay = masked_sum(after_mask(L, LOG_L), g, PIECES, MASK_PREC)
    # g_tot[i, j] = sum of g over the chunk for key i, in every value column j: a product on the tensor cores
    # too, which leaves the result in the layout of the products (a reduction over the rows crosses warps)
    g_tot = column_sums(g, L, BV, PIECES, MASK_PREC)
    aq = a * exp(g_decay)
    return exp(g_tot) * S + mm(tl.trans(aq), bm, STATE_PREC), g_tot


@triton.jit
def state_scan_kernel(a_ptr, b_ptr, w_ptr, init_ptr, last_ptr, states_ptr, seg_ptr, seg_log_ptr, cum_ptr,
                      T, H, NC, SEG, stride_t,
                      N: tl.constexpr, L: tl.constexpr, LOG_L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      G: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr,
                      STATE_PREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    tl.static_assert(L == 1 << LOG_L, "the chunk must be L = 2^LOG_L rows")
    tl.static_assert(N % BK == 0, "the key block BK must divide the head size N")
    tl.static_assert(N % BV == 0, "the value block BV must divide the head size N")
    bh = tl.program_id(0) // G
    seg = tl.program_id(0) % G            # segment of chunks [seg * SEG, (seg + 1) * SEG)
    b = bh // H
    h = bh % H
    head = head_base(b, h, T, stride_t, N)
    kcols = tl.program_id(1) * BK + tl.arange(0, BK)   # key channels of this tile
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)   # value channels
    state_offs = kcols[:, None] * N + vcols[None, :]
    # per-key sums are (BK, BV) tiles, every column the same: written from the first value channel only
    per_key = (kcols[:, None] * 0 + vcols[None, :]) == 0
    key_offs = kcols[:, None] + vcols[None, :] * 0
    S = tl.zeros([BK, BV], dtype=tl.float32)    # with segments, each from zero: combine_kernel adds the rest
    if HAS_INIT and G == 1:
        S = tl.load(init_ptr + bh.to(tl.int64) * N * N + state_offs).to(tl.float32)
    g_seg = tl.zeros([BK, BV], dtype=tl.float32)    # sum of g_tot over the segment's chunks so far
    first = seg * SEG
    count = tl.minimum(SEG, NC - first)
    for step in range(count):
        if REVERSE:
            c = first + count - 1 - step
            # gradient w.r.t. the state at the end of chunk c
            tl.store(states_ptr + (bh.to(tl.int64) * NC + c) * N * N + state_offs, S.to(states_ptr.dtype.element_ty))
        else:
            c = first + step
        if REVERSE and G > 1:   # the decay from the end of chunk c to the end of the segment
            tl.store(cum_ptr + (bh.to(tl.int64) * NC + c) * N + key_offs, g_seg, mask=per_key)
        base = row_base(head, c * L, stride_t)                 # chunk c's first row; rows relative to it
        S, g_tot = chunk_step(S, a_ptr, b_ptr, w_ptr, base, T - c * L, stride_t, kcols, vcols, L, LOG_L, BV,
                              REVERSE, STATE_PREC, PIECES, MASK_PREC)
        g_seg += g_tot
        if not REVERSE and G > 1:   # the decay from the start of the segment to the end of chunk c
            tl.store(cum_ptr + (bh.to(tl.int64) * NC + c) * N + key_offs, g_seg, mask=per_key)
        if not REVERSE:
            # state at the start of chunk c + 1 (none stored after the last chunk: that is the final state)
            tl.store(states_ptr + (bh.to(tl.int64) * (NC - 1) + c) * N * N + state_offs,
                     S.to(states_ptr.dtype.element_ty), mask=(state_offs * 0 + c) < NC - 1)
    if G == 1:
        if STORE_LAST:
            tl.store(last_ptr + bh.to(tl.int64) * N * N + state_offs, S)
    else:
        tl.store(seg_ptr + (bh.to(tl.int64) * G + seg) * N * N + state_offs, S)
        tl.store(seg_log_ptr + (bh.to(tl.int64) * G + seg) * N + key_offs, g_seg, mask=per_key)


@triton.jit
def varlen_scan_kernel(a_ptr, b_ptr, w_ptr, init_ptr, last_ptr, states_ptr, chunks_ptr, sequences_ptr,
                       H, n, NC, stride_t,
                       N: tl.constexpr, L: tl.constexpr, LOG_L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr,
                       STATE_PREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """The scan of packed sequences (B == 1): one program per (head, sequence, tile) walks its sequence's own chunks
    (the sequences are independent: they are the segments, each from its own start). sequences (n, 2) int32: the
    first chunk and the number of chunks of each sequence; chunks: the chunk table (packed.ChunkTable.packed).

    Forward: from S = init[i] (s0 of sequence i, or 0), stores S at the start of every chunk (states (H, NC, N, N))
    and the sequence's final state in last[i]. Backward (REVERSE): from S = init[i] (the gradient of sequence i's
    final state, or 0), stores S at the end of every chunk and the gradient of its start state in last[i]. An empty
    sequence walks no chunk: its final state is its start state (backward: the gradient passes straight through)."""
    tl.static_assert(L == 1 << LOG_L, "the chunk must be L = 2^LOG_L rows")
    tl.static_assert(N % BK == 0, "the key block BK must divide the head size N")
    tl.static_assert(N % BV == 0, "the value block BV must divide the head size N")
    h = tl.program_id(0) // n
    seq = tl.program_id(0) % n
    head = h.to(tl.int64) * N                             # (t=0, h, 0) of the one batch row
    kcols = tl.program_id(1) * BK + tl.arange(0, BK)   # key channels of this tile
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)   # value channels
    state_offs = kcols[:, None] * N + vcols[None, :]
    own = (seq.to(tl.int64) * H + h) * N * N + state_offs     # sequence seq's state in an (n, H, N, N) tensor
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        S = tl.load(init_ptr + own).to(tl.float32)
    first = tl.load(sequences_ptr + 2 * seq)
    count = tl.load(sequences_ptr + 2 * seq + 1)
    for step in range(count):
        if REVERSE:
            c = first + count - 1 - step
        else:
            c = first + step
        # the state at the chunk's start (backward: the gradient at its end)
        tl.store(states_ptr + (h.to(tl.int64) * NC + c) * N * N + state_offs, S.to(states_ptr.dtype.element_ty))
        base = row_base(head, tl.load(chunks_ptr + c * 4 + START), stride_t)
        S, g_tot = chunk_step(S, a_ptr, b_ptr, w_ptr, base, tl.load(chunks_ptr + c * 4 + COUNT), stride_t, kcols,
                              vcols, L, LOG_L, BV, REVERSE, STATE_PREC, PIECES, MASK_PREC)
    if STORE_LAST:
        tl.store(last_ptr + own, S)


@triton.jit
def combine_kernel(init_ptr, last_ptr, seg_ptr, seg_log_ptr,
                   N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, G: tl.constexpr,
                   REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr):
    """seg[g] <- the true state at the start of segment g (backward: the gradient at its end), in place of its
    own end state E_g; last <- the final state (backward: the gradient of s0)."""
    bh = tl.program_id(0)
    kcols = tl.program_id(1) * BK + tl.arange(0, BK)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * N + vcols[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        S = tl.load(init_ptr + bh.to(tl.int64) * N * N + state_offs).to(tl.float32)
    for i in range(G):
        seg = G - 1 - i if REVERSE else i
        offs = (bh.to(tl.int64) * G + seg) * N * N + state_offs
        E = tl.load(seg_ptr + offs)
        tl.store(seg_ptr + offs, S)
        S = exp(tl.load(seg_log_ptr + (bh.to(tl.int64) * G + seg) * N + kcols))[:, None] * S + E
    if STORE_LAST:
        tl.store(last_ptr + bh.to(tl.int64) * N * N + state_offs, S)


@triton.jit
def fixup_kernel(states_ptr, seg_ptr, cum_ptr, NC, M, SEG, N: tl.constexpr, G: tl.constexpr):
    """Stored state c += diag(exp(cum_c)) (true state of c's segment): one program per stored state. Stored state c
    is the one at the end of chunk c (the start of chunk c + 1 forward: M = NC - 1 of them; backward M = NC)."""
    pid = tl.program_id(0)
    bh = pid // M
    c = pid % M
    kcols = tl.arange(0, N)
    state_offs = kcols[:, None] * N + kcols[None, :]
    offs = pid.to(tl.int64) * N * N + state_offs
    start = tl.load(seg_ptr + (bh.to(tl.int64) * G + c // SEG) * N * N + state_offs)
    decay = exp(tl.load(cum_ptr + (bh.to(tl.int64) * NC + c) * N + kcols))
    fixed = tl.load(states_ptr + offs).to(tl.float32) + decay[:, None] * start
    tl.store(states_ptr + offs, fixed.to(states_ptr.dtype.element_ty))


def launch_scan(a, b, w, init, last, states, reverse, precisions, settings, L, varlen=None):
    """a, b, w: (B, T, H, N); init: (B, H, N, N) float32 or None; last: (B, H, N, N) or None (not stored);
    states: (B, H, NC - 1, N, N) forward / (B, H, NC, N, N) backward, in precisions.states_dtype;
    precisions: the shared.Precisions of the inputs; settings: settings.Settings; L: the chunk length.
    varlen: None, or for packed sequences (B == 1) their common.Varlen: then init and last are (n, H, N, N), one
    per sequence, and states (1, H, NC, N, N) both ways (varlen_scan_kernel)."""
    B, T, H, N = a.shape
    if varlen is not None:
        NC, n = varlen.chunks.shape[0], varlen.sequences.shape[0]
        launch = settings.scan_for(N, n * H)
        BK, BV = launch.block_k, launch.block_v
        varlen_scan_kernel[(H * n, N // BK, N // BV)](
            a, b, w, init, last, states, varlen.chunks, varlen.sequences, H, n, NC, H * N,
            N=N, L=L, LOG_L=L.bit_length() - 1, BK=BK, BV=BV, REVERSE=reverse, HAS_INIT=init is not None,
            STORE_LAST=last is not None, **precision_args(precisions, "STATE_PREC", "PIECES", "MASK_PREC"),
            num_warps=launch.num_warps, num_stages=launch.num_stages)
        return
    NC = -(-T // L)
    launch = settings.scan_for(N, B * H)
    BK, BV = launch.block_k, launch.block_v
    tiles = (N // BK, N // BV)
    G = settings.segments_for(NC, B * H * tiles[0] * tiles[1])
    SEG = -(-NC // G)
    G = -(-NC // SEG)
    seg = seg_log = cum = None   # the segments' own states: with G > 1 only
    if G > 1:
        seg = torch.empty((B, H, G, N, N), dtype=torch.float32, device=a.device)
        seg_log = torch.empty((B, H, G, N), dtype=torch.float32, device=a.device)
        cum = torch.empty((B, H, NC, N), dtype=torch.float32, device=a.device)
    state_scan_kernel[(B * H * G,) + tiles](
        a, b, w, init, last, states, seg, seg_log, cum, T, H, NC, SEG, H * N,
        N=N, L=L, LOG_L=L.bit_length() - 1, BK=BK, BV=BV, G=G, REVERSE=reverse, HAS_INIT=init is not None,
        STORE_LAST=last is not None,
        **precision_args(precisions, "STATE_PREC", "PIECES", "MASK_PREC"), num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    if G > 1:
        combine_kernel[(B * H,) + tiles](init, last, seg, seg_log, N=N, BK=BK, BV=BV, G=G, REVERSE=reverse,
                                         HAS_INIT=init is not None, STORE_LAST=last is not None,
                                         num_warps=launch.num_warps)
        if states.numel():
            M = NC if reverse else NC - 1
            fixup_kernel[(B * H * M,)](states, seg, cum, NC, M, SEG, N=N, G=G, num_warps=4)
