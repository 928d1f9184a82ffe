"""The forward chunk kernel: the outputs (docs/math.md, "Chunks" and "Sub-blocks").

One program per (batch row, head, sub-block J of C rows of a chunk of L tokens, block of BV value channels). The
scan stores the state at each chunk's start; a program moves it to its own sub-block's start S_J through the
sub-blocks before it (L / C - 1 at most), then, with pre_t = prod_{t0<=m<t} d_m inside the sub-block:

    y_t = sum_{s<t in J} A[t, s] v_s  +  (r_t . u k_t) v_t  +  (r_t * pre_t) . S_J
    S_{J+1} = diag(tot_J) S_J + sum_{s in J} (k_s * suf_s) v_s^T          (suf_s = prod_{s<m<=t1} d_m)

with A[t, s] = sum_i r_t[i] k_s[i] prod_{s<m<t} d_m[i] from the binary tree of levels (levels.py): all of it
matrix products on the tensor cores, every decay factor exp of a direct sum of g (<= 0). Splitting at the
sub-block boundary is rule 2 of docs/math.md with the state as the carrier. The state is loaded last, so that it
does not hold registers while the pairs are built.
"""
import triton
import triton.language as tl

from .common import chunk_rows, g_rows, launch_chunks, load_rows, mm, precision_args, store_rows
from .levels import pair_scores, pre_factor
from .masks import level_table_for
from .sub_blocks import sub_block, sub_block_start


@triton.jit
def forward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, y_ptr, chunks_ptr, levels_ptr,
                   T, H, NC, stride_t,
                   N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
                   PREC: tl.constexpr, STATE_PREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr,
                   HAS_S0: tl.constexpr, HAS_STATES: tl.constexpr, VARLEN: tl.constexpr, MASK_TABLE: tl.constexpr):
    tl.static_assert(C == 1 << LOG_C, "the sub-block C must be 2^LOG_C rows")
    tl.static_assert(L % C == 0, "a chunk of L rows must be whole sub-blocks of C rows")
    tl.static_assert(N % BV == 0, "the value block BV must divide the head size N")
    bh, c, J = sub_block(tl.program_id(0), NC, L, C)
    b = bh // H
    h = bh % H
    base, T = chunk_rows(chunks_ptr, b, h, c, T, stride_t, N, L, VARLEN)   # the chunk's first row, rows from there on
    if VARLEN:
        if T <= 0:   # a chunk past the packed sequences' last one: no rows (and no state stored for it)
            return
    kcols = tl.arange(0, N)
    vcols = tl.program_id(1) * BV + tl.arange(0, BV)
    idx = tl.arange(0, C)
    rows = J * C + idx
    r = load_rows(r_ptr, base, rows, T, kcols, stride_t)
    k = load_rows(k_ptr, base, rows, T, kcols, stride_t)
    g = g_rows(w_ptr, base, rows, idx >= 0, T, kcols, stride_t)          # 0 past T: decay 1
    A = pair_scores(r, k, g, levels_ptr, C, LOG_C, PREC, PIECES, MASK_PREC, MASK_TABLE)
    u = tl.load(u_ptr + h * N + kcols)
    bonus = tl.sum(r * u[None, :] * k, 1)
    rq = r * pre_factor(g, LOG_C, C, PIECES, MASK_PREC)
    v = load_rows(v_ptr, base, rows, T, vcols, stride_t)
    y = mm(A, v, PREC) + bonus[:, None] * v                             # the pairs, and the bonus
    S = sub_block_start(s0_ptr, states_ptr, k_ptr, v_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                        N, C, LOG_C, STATE_PREC, PIECES, MASK_PREC, HAS_S0, HAS_STATES, VARLEN)  # (N, BV)
    y += mm(rq, S, STATE_PREC)                                                # through the state
    store_rows(y_ptr, base, rows, T, vcols, stride_t, y)


def launch_forward(r, k, v, w, u, s0, states, y, precisions, settings, L, varlen=None):
    """precisions: the shared.Precisions of the inputs; settings: settings.Settings; L: the chunk length; varlen:
    None, or for packed sequences (B == 1) their common.Varlen, with states (1, H, NC, N, N) (s0 None: the first
    chunks' start states are in `states`)."""
    B, T, H, N = r.shape
    chunks, NC = launch_chunks(T, L, varlen)
    C = settings.sub_block
    launch = settings.forward_for(N)
    BV = launch.block_v
    grid = (B * H * NC * (L // C), N // BV)
    has_states = states.numel() > 0   # none when NC == 1
    forward_kernel[grid](r, k, v, w, u, s0, states if has_states else None, y, chunks,
                         level_table_for(settings, r.device), T, H, NC, H * N,
                         N=N, BV=BV, L=L, C=C, LOG_C=C.bit_length() - 1,
                         **precision_args(precisions, "PREC", "STATE_PREC", "PIECES", "MASK_PREC"),
                         HAS_S0=s0 is not None, HAS_STATES=has_states, VARLEN=varlen is not None,
                         MASK_TABLE=settings.mask_table,
                         num_warps=launch.num_warps, **({"maxnreg": launch.maxnreg} if launch.maxnreg else {}))
