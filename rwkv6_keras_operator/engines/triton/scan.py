"""The state scan across chunks (docs/math.md, "Chunks" and "The backward pass").

Forward: S_{c+1} = diag(tot_c) S_c + sum_{s in c} (k_s * suf_s) v_s^T, from S_0 = s0 (or 0), chunk after chunk.
    Stores the start state of chunks 1 .. NC-1 (what the output kernel and the backward read) and the final state.
Backward: dS_{c-1} = diag(tot_c) dS_c + sum_{t in c} (r_t * pre_t) dy_t^T, from dS = dstate (or 0) at the end of
    the last chunk back to the first. Stores dS at the end of every chunk, and the gradient of s0.

Both are the same update, S <- diag(exp(tot)) S + (a * exp(D))^T b, with (a, b, D) = (k, v, suffix sums) forward
and (r, dy, prefix sums) backward. Every (i, j) entry of S evolves on its own, so a program owns a BK x BV tile of
one head's state and walks the chunks in order: the sequential part is one small matrix product per chunk.
"""
import triton
import triton.language as tl

from .common import g_rows, g_vec, head_base, load_rows, row_base


@triton.jit
def state_scan_kernel(a_ptr, b_ptr, w_ptr, init_ptr, out_ptr, chunks_ptr,
                      T, H, NC, stride_t, has_init,
                      N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      REVERSE: tl.constexpr, STORE_OUT: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    head = head_base(b, h, T, stride_t, N)
    ik = tl.program_id(1) * BK + tl.arange(0, BK)   # key channels of this tile
    jv = tl.program_id(2) * BV + tl.arange(0, BV)   # value channels
    idx = tl.arange(0, L)
    soffs = ik[:, None] * N + jv[None, :]
    S = tl.load(init_ptr + bh.to(tl.int64) * N * N + soffs, mask=soffs < has_init * N * N, other=0.0).to(tl.float32)
    for step in range(NC):
        if REVERSE:
            c = NC - 1 - step
            # gradient w.r.t. the state at the end of chunk c
            tl.store(chunks_ptr + (bh.to(tl.int64) * NC + c) * N * N + soffs, S)
        else:
            c = step
        base = row_base(head, c * L, stride_t)                 # chunk c's first row; rows relative to it
        Tc = T - c * L
        rows = idx
        a = load_rows(a_ptr, base, rows, Tc, ik, stride_t)     # (L, BK)
        bm = load_rows(b_ptr, base, rows, Tc, jv, stride_t)    # (L, BV)
        if REVERSE:
            # pre_t = exp(sum_{cL <= m < t} g_m): g of the row before, summed forward
            g_prev = g_rows(w_ptr, base, rows - 1, idx > 0, Tc, ik, stride_t)
            D = tl.cumsum(g_prev, 0)
            tot = tl.sum(g_prev, 0) + g_vec(w_ptr, base, L - 1, Tc, ik, stride_t)
        else:
            # suf_s = exp(sum_{s < m < (c+1)L} g_m): g of the row after, summed backward
            g_next = g_rows(w_ptr, base, rows + 1, idx < L - 1, Tc, ik, stride_t)
            D = tl.cumsum(g_next, 0, reverse=True)
            tot = tl.sum(g_next, 0) + g_vec(w_ptr, base, 0, Tc, ik, stride_t)
        aq = a * tl.exp(D)
        S = tl.exp(tot)[:, None] * S + tl.dot(tl.trans(aq), bm, input_precision=PREC)
        if not REVERSE:
            # state at the start of chunk c + 1 (none stored after the last chunk: that is the final state)
            tl.store(chunks_ptr + (bh.to(tl.int64) * (NC - 1) + c) * N * N + soffs, S,
                     mask=(soffs * 0 + c) < NC - 1)
    if STORE_OUT:
        tl.store(out_ptr + bh.to(tl.int64) * N * N + soffs, S)


# Launch settings override (benchmarks/gpu_torch.py, VARIANTS=1): {"many": (BK, BV, warps, stages), "few": ...}
TUNE = {}


def scan_tiles(N, BH):
    """(BK, BV, num_warps, num_stages) for the scan: split the key channels first (no duplicated work), and the
    value channels too when there are few heads (long sequences, small batch) so that more programs run at once.
    H200, bf16, 32-token chunks, both scans: B*H = 256 (training shape) 32 x 64 tiles 1.02 ms, 16 x 64 1.22;
    B*H = 32 (long context) 16 x 32 tiles 1.55 ms, 32 x 64 2.34."""
    many = BH * max(N // 16, 1) >= 512
    BK = min(N, 32 if many else 16)
    BV = N if (many or N <= 16) else max(16, N // 2)
    return TUNE.get("many" if many else "few", (BK, min(BV, 64), 4, 3))


def launch_scan(a, b, w, init, out, chunks, reverse, prec, L):
    """a, b, w: (B, T, H, N); init: (B, H, N, N) float32 or None; out: (B, H, N, N) or None (not stored);
    chunks: (B, H, NC - 1, N, N) forward / (B, H, NC, N, N) backward."""
    B, T, H, N = a.shape
    NC = -(-T // L)
    BK, BV, warps, stages = scan_tiles(N, B * H)
    grid = (B * H, N // BK, N // BV)
    dummy = chunks if chunks.numel() else a
    state_scan_kernel[grid](
        a, b, w, init if init is not None else dummy, out if out is not None else dummy, chunks,
        T, H, NC, H * N, int(init is not None),
        N=N, L=L, BK=BK, BV=BV, REVERSE=reverse, STORE_OUT=out is not None, PREC=prec, num_warps=warps,
        num_stages=stages)
