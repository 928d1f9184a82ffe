"""One step of the recurrence (T == 1: generation with a carried state), straight from the contract:

    y[j]     = sum_i r[i] (u[i] k[i] v[j] + S[i, j])
    S'[i, j] = exp(g[i]) S[i, j] + k[i] v[j]

A program owns an N x BV tile of one head's state: it reads it once and writes the new one once, so the step
runs at the speed of moving the state (2 * 4 N^2 bytes per head).
"""
import triton
import triton.language as tl

from .common import exp, log_decay


@triton.jit
def step_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, y_ptr, s1_ptr, H,
                N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
    tl.static_assert(N % BV == 0, "the value block BV must divide the head size N")
    bh = tl.program_id(0)
    h = bh % H
    kcols = tl.arange(0, N)
    vcols = tl.program_id(1) * BV + tl.arange(0, BV)
    base = bh.to(tl.int64) * N                     # (B, 1, H, N): row b, head h
    r = tl.load(r_ptr + base + kcols).to(tl.float32)
    k = tl.load(k_ptr + base + kcols).to(tl.float32)
    v = tl.load(v_ptr + base + vcols).to(tl.float32)
    d = exp(log_decay(tl.load(w_ptr + base + kcols)))
    u = tl.load(u_ptr + h * N + kcols)
    state_offs = kcols[:, None] * N + vcols[None, :]
    offs = bh.to(tl.int64) * N * N + state_offs
    S = tl.zeros([N, BV], dtype=tl.float32)        # no start state: zeros
    if HAS_S0:
        S = tl.load(s0_ptr + offs).to(tl.float32)
    y = tl.sum(r[:, None] * S, 0) + tl.sum(r * u * k, 0) * v
    tl.store(y_ptr + base + vcols, y.to(y_ptr.dtype.element_ty))
    tl.store(s1_ptr + offs, d[:, None] * S + k[:, None] * v[None, :])


def launch_step(r, k, v, w, u, s0, y, s1):
    B, T, H, N = r.shape
    BV = min(N, 16)
    step_kernel[(B * H, N // BV)](r, k, v, w, u, s0, y, s1, H, N=N, BV=BV, HAS_S0=s0 is not None, num_warps=2)
