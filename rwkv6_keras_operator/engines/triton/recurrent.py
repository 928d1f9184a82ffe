"""One step of the recurrence (T == 1: generation with a carried state), straight from the contract:

    y[j]     = sum_i r[i] (u[i] k[i] v[j] + S[i, j])
    S'[i, j] = exp(g[i]) S[i, j] + k[i] v[j]

A program owns an N x BV tile of one head's state: it reads it once and writes the new one once, so the step
runs at the speed of moving the state (2 * 4 N^2 bytes per head). The same kernel serves a state pool (pool.py):
with SLOTS, row b reads and writes the state pool[slots[b]] in place. That is safe because every program reads its
tile of the state before it writes that same tile, and no other program touches it (the slots are distinct).
"""
import torch
import triton
import triton.language as tl

from ..step_settings import StepSettings
from .common import exp, log_decay
from .launcher import CachedLaunch, aligned


# Programs run in the order (row, head, column block) on one grid axis: B * H reaches 131072 at B = 4096, H = 32,
# past the 65535 of CUDA's second and third grid axes.
STEP = StepSettings()


@triton.jit
def step_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, s0_stride, slots_ptr, y_ptr, s1_ptr, H,
                N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, SLOTS: tl.constexpr):
    """r, k, v, w, y: (B, 1, H, N) contiguous (or (B, 1, C)); u (H, N) float32. The state of row b, head h: without
    SLOTS read from s0 at b * s0_stride + (h, 0, 0) (zeros unless HAS_S0; s0_stride 0: one state shared by all rows)
    and written to s1[b, h], (B, H, N, N); with SLOTS read from and written to s0[slots[b], h] = s1[slots[b], h]
    (s0_ptr == s1_ptr: a pool (n, H, N, N) updated in place)."""
    tl.static_assert(N % BV == 0, "the value block BV must divide the head size N")
    NB = N // BV
    pid = tl.program_id(0)
    bh = pid // NB
    b = bh // H
    h = bh % H
    kcols = tl.arange(0, N)
    vcols = (pid % NB) * BV + tl.arange(0, BV)
    base = bh.to(tl.int64) * N                      # (B, 1, H, N): row b, head h
    r = tl.load(r_ptr + base + kcols).to(tl.float32)
    k = tl.load(k_ptr + base + kcols).to(tl.float32)
    v = tl.load(v_ptr + base + vcols).to(tl.float32)
    d = exp(log_decay(tl.load(w_ptr + base + kcols)))
    u = tl.load(u_ptr + h * N + kcols)
    state_offs = kcols[:, None] * N + vcols[None, :]
    if SLOTS:
        s0_base = (tl.load(slots_ptr + b).to(tl.int64) * H + h) * (N * N)
        s1_base = s0_base
    else:
        s0_base = b.to(tl.int64) * s0_stride + h * (N * N)
        s1_base = bh.to(tl.int64) * (N * N)
    if HAS_S0:
        S = tl.load(s0_ptr + s0_base + state_offs)
    else:
        S = tl.zeros((N, BV), tl.float32)
    y = tl.sum(r[:, None] * S, 0) + tl.sum(r * u * k, 0) * v
    tl.store(y_ptr + base + vcols, y.to(y_ptr.dtype.element_ty))
    tl.store(s1_ptr + s1_base + state_offs, d[:, None] * S + k[:, None] * v[None, :])


LAUNCH = CachedLaunch(step_kernel)
_GEOMETRY = {}


def geometry(settings, N):
    """(settings, BV, num_warps) of a launch with head size N, memoised: a decode step's launch is short."""
    found = _GEOMETRY.get((id(settings), N))
    if found is None or found[0] is not settings:
        found = _GEOMETRY[id(settings), N] = (settings, settings.columns(N), settings.warps(N))
    return found


def launch_step(r, k, v, w, u, s0, y, s1, slots=None, settings=None):
    """y, s1 <- one step from s0 (None: zeros). r, k, v, w, y: (B, 1, H, N) or (B, 1, C) contiguous; u: (H, N)
    float32 contiguous; s0: (B, H, N, N) float32 whose rows are contiguous, the row stride any (0: broadcast).
    slots: None, or a (B,) integer tensor: then s0 is s1, the pool, updated in place at rows slots. settings: the
    launch geometry (default: STEP). Launched on the current device, through launcher.py (little host time)."""
    H, N = u.shape
    _, BV, warps = geometry(settings or STEP, N)
    has_s0, has_slots = s0 is not None, slots is not None
    s0_stride = s0.stride(0) if has_s0 else 0
    device = r.get_device()
    # Everything the compiled kernel is specialised on (launcher.py), or None: the normal launch.
    key = (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype, s0.dtype if has_s0 else None,
           slots.dtype if has_slots else None, y.dtype, s1.dtype, s0_stride, H, N, BV, warps, device
           ) if aligned(r, k, v, w, u, s0, slots, y, s1) else None
    LAUNCH((r.shape[0] * H * (N // BV),), key,
           (r, k, v, w, u, s0, s0_stride, slots, y, s1, H, N, BV, has_s0, has_slots), device, num_warps=warps)


def rows_contiguous(s):
    """s (B, H, N, N) with each row s[b] contiguous: a plain tensor, or one state broadcast to B rows (stride 0)."""
    return s.is_contiguous() or (s.stride(0) == 0 and s[0].is_contiguous())


def step(r, k, v, w, u, s0):
    """Eager one-step forward: y in r's shape ((B, 1, H, N) or (B, 1, C)) and dtype, and the new state (B, H, N, N)
    float32. u: (H, N); s0: (B, H, N, N) or None."""
    H, N = u.shape
    r, k, v, w = r.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    u = (u if u.dtype == torch.float32 else u.float()).contiguous()
    if s0 is not None:
        if s0.dtype != torch.float32:
            s0 = s0.float()
        if not rows_contiguous(s0):
            s0 = s0.contiguous()
    y = torch.empty_like(r)
    s1 = r.new_empty((r.shape[0], H, N, N), dtype=torch.float32)
    if on_current_device(r):
        launch_step(r, k, v, w, u, s0, y, s1)
    else:
        with torch.cuda.device(r.device):
            launch_step(r, k, v, w, u, s0, y, s1)
    return y, s1


def on_current_device(x):
    """x is on the current CUDA device, or on the CPU (the interpreter): Triton launches on the current device."""
    return not x.is_cuda or x.get_device() == torch.cuda.current_device()
