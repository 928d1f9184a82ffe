"""The chunked forward output (docs/math.md, "Chunks" and "Sub-blocks").

One program per (batch row, head, chunk of L = 64 tokens). It starts from the chunk's start state S (written by
the scan) and walks the chunk as L / C sub-blocks of C = 16 rows, carrying the state from one sub-block to the
next in registers. For a sub-block J with start state S_J, pre_t = prod_{t0<=m<t} d_m, suf_s = prod_{s<m<=t1} d_m
and tot = prod over the sub-block:

    y_t   = (r_t * pre_t) . S_J  +  sum_{s <= t in J} A[t, s] v_s           (tensor cores: C x N x BV)
    S_J+1 = diag(tot) S_J  +  sum_{s in J} (k_s * suf_s) v_s^T                (tensor cores: N x C x BV)

and the pairs inside the sub-block are summed element by element from direct products (bands.py, which also
yields pre) or, with TREE, on the tensor cores level by level (tree.py), with the bonus on the diagonal:

    A[t, s] = sum_i r_t[i] k_s[i] prod_{s<m<t} d_m[i]   (s < t),     A[t, t] = sum_i r_t[i] u[i] k_t[i].

suf and tot are exp of direct sums of g (cumsum of the next row's g, and the sub-block's sum).

Splitting at the sub-block boundary is rule 2 of docs/math.md with the state as the carrier: every factor is
exp of a direct sum over a contiguous range (<= 0) or a product of decays, so nothing overflows or cancels.
"""
import triton
import triton.language as tl

from .bands import band_rows, store_decays
from . import tree
from .common import chunk_start_state, g_rows, head_base, load_rows, row_base, store_rows


@triton.jit
def forward_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, y_ptr, d_ptr,
                   T, H, NC, stride_t, has_s0,
                   N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
                   TREE: tl.constexpr, EXP_PREC: tl.constexpr):
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
        t0 = J * C
        rows = t0 + idx
        r = load_rows(r_ptr, base, rows, T, cols, stride_t)
        k = load_rows(k_ptr, base, rows, T, cols, stride_t)
        v = load_rows(v_ptr, base, rows, T, jv, stride_t)
        if TREE:
            g = g_rows(w_ptr, base, rows, idx >= 0, T, cols, stride_t)
            pre = tl.exp(tl.cumsum(g_rows(w_ptr, base, rows - 1, idx > 0, T, cols, stride_t), 0))
            A = tree.pair_matrix(r_ptr, k_ptr, g, base, t0, T, stride_t, cols, C, PREC, EXP_PREC)
            A = tl.where(idx[:, None] == idx[None, :], tl.sum(r * u[None, :] * k, 1)[:, None], A)
            y = tl.dot(A, v, input_precision=PREC)
        else:
            g, d = store_decays(w_ptr, d_ptr, base, rows, T, cols, stride_t)
            tl.debug_barrier()                                              # the scratch d is written
            y, pre = band_rows(r_ptr, k_ptr, v_ptr, d_ptr, base, t0, T, stride_t, cols, jv, C)   # pairs inside
            y += tl.sum(r * u[None, :] * k, 1)[:, None] * v                  # the bonus
        y += tl.dot(r * pre, S, input_precision=PREC)                        # through the state
        store_rows(y_ptr, base, rows, T, jv, stride_t, y)
        # the next sub-block's start state (after the last one: unused);
        # suf_s = exp(sum_{s<m<t0+C} g_m): g of the row after, summed backward (direct sums, <= 0)
        g_next = g_rows(w_ptr, base, rows + 1, idx < C - 1, T, cols, stride_t)
        kq = k * tl.exp(tl.cumsum(g_next, 0, reverse=True))
        S = tl.exp(tl.sum(g, 0))[:, None] * S + tl.dot(tl.trans(kq), v, input_precision=PREC)


# Launch settings, by head size; the benchmark may override them (benchmarks/gpu_torch.py, VARIANTS=1).
TUNE = {}


def forward_config(N):
    """(BV, num_warps, tree): one program covers all value channels up to N = 64; N = 128 splits them in two.
    tree: the pairs inside a sub-block on the tensor cores (tree.py) instead of the diagonal bands (bands.py)."""
    return TUNE.get(N, (N, 4, False) if N <= 64 else (64, 8, False))


def launch_forward(r, k, v, w, u, s0, states, y, scratch, prec, L, C):
    """scratch: float32 like r (the decays, written and read by the kernel)."""
    B, T, H, N = r.shape
    NC = -(-T // L)
    BV, warps, use_tree = forward_config(N)
    grid = (B * H * NC, N // BV)
    forward_kernel[grid](r, k, v, w, u, s0 if s0 is not None else u, states if states.numel() else u, y, scratch,
                         T, H, NC, H * N, int(s0 is not None),
                         N=N, BV=BV, L=L, C=C, PREC=prec, TREE=use_tree,
                         EXP_PREC="tf32x3" if prec == "tf32x3" else "tf32", num_warps=warps)
