"""The chunked forward output (docs/math.md, "Chunks" and "Sub-blocks").

One program per (batch row, head, chunk of L tokens, block of BV value channels). It starts from the chunk's
start state S (written by the scan) and walks the chunk as L / C sub-blocks of C rows, carrying the state from
one sub-block to the next in registers. For a sub-block J with start state S_J, pre_t = prod_{t0<=m<t} d_m,
suf_s = prod_{s<m<=t1} d_m and tot = prod over the sub-block:

    y_t   = sum_{s<t in J} A[t, s] v_s  +  (r_t . u k_t) v_t  +  (r_t * pre_t) . S_J
    S_J+1 = diag(tot) S_J  +  sum_{s in J} (k_s * suf_s) v_s^T

with A[t, s] = sum_i r_t[i] k_s[i] prod_{s<m<t} d_m[i] from the binary tree of levels (levels.py): all of it
matrix products on the tensor cores, every decay factor exp of a direct sum of g (<= 0). Splitting at the
sub-block boundary is rule 2 of docs/math.md with the state as the carrier.
"""
import triton
import triton.language as tl

from .common import chunk_start_state, g_rows, head_base, load_rows, mm, row_base, store_rows
from .levels import level_decays, pair_scores, split


@triton.jit
def forward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, y_ptr,
                   T, H, NC, stride_t, has_s0,
                   N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
                   PREC: tl.constexpr, SPREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    pid = tl.program_id(0)
    c = pid % NC
    bh = pid // NC
    b = bh // H
    h = bh % H
    base = row_base(head_base(b, h, T, stride_t, N), c * L, stride_t)   # the chunk's first row
    T = T - c * L                                                          # rows from there on
    cols = tl.arange(0, N)
    jv = tl.program_id(1) * BV + tl.arange(0, BV)
    u = tl.load(u_ptr + h * N + cols)
    S = chunk_start_state(s0_ptr, states_ptr, bh, c, NC, has_s0, cols, jv, N)     # (N, BV)
    idx = tl.arange(0, C)
    for J in range(L // C):
        rows = J * C + idx
        r = load_rows(r_ptr, base, rows, T, cols, stride_t)
        k = load_rows(k_ptr, base, rows, T, cols, stride_t)
        v = load_rows(v_ptr, base, rows, T, jv, stride_t)
        g = g_rows(w_ptr, base, rows, idx >= 0, T, cols, stride_t)          # 0 past T: decay 1
        hi, mid, lo = split(g, PIECES)
        A = pair_scores(r, k, hi, mid, lo, C, LOG_C, PREC, PIECES, MASK_PREC)
        pre, suf = level_decays(hi, mid, lo, LOG_C, C, PIECES, MASK_PREC)
        y = mm(A, v, PREC) + tl.sum(r * u[None, :] * k, 1)[:, None] * v   # the pairs, and the bonus
        y += mm(r * pre, S, SPREC)                                          # through the state
        store_rows(y_ptr, base, rows, T, jv, stride_t, y)
        S = tl.exp(tl.sum(g, 0))[:, None] * S + mm(tl.trans(k * suf), v, SPREC)


# Launch settings, by head size; the benchmark may override them (benchmarks/gpu_torch.py, VARIANTS=1).
TUNE = {}


def forward_config(N):
    """(BV, num_warps): one program covers all value channels up to N = 64; N = 128 splits them in two."""
    return TUNE.get(N, (N, 4) if N <= 64 else (64, 8))


def launch_forward(r, k, v, w, u, s0, states, y, precisions, L, C):
    """precisions: common.Precisions of the inputs' dtype."""
    B, T, H, N = r.shape
    NC = -(-T // L)
    BV, warps = forward_config(N)
    grid = (B * H * NC, N // BV)
    forward_kernel[grid](r, k, v, w, u, s0 if s0 is not None else u, states if states.numel() else u, y,
                         T, H, NC, H * N, int(s0 is not None),
                         N=N, BV=BV, L=L, C=C, LOG_C=C.bit_length() - 1, **precisions.kernel_args(),
                         num_warps=warps)
