"""Triton helpers shared by the kernels: the log-decay, tile loads, and chunk-local decay sums.

Layout: r, k, v, w, y and their gradients are (B, T, H, N), contiguous, so row t of head h of batch row b starts
at ((b * T + t) * H + h) * N; the token stride is H * N. A kernel adds the int64 offset of its chunk's first row
to the pointer once (B * T * C may pass 2^31) and addresses rows relative to it in int32 (`base` below is that
int64 scalar, `rows` are chunk-relative and `T` counts the rows left from the chunk's start).
States are (B, H, N, N) float32 (S[i, j]: i the key channel, j the value channel).

Exactness (docs/math.md): every decay factor is exp(sum of g over a contiguous range), the sum taken directly
(cumsum of the g's of exactly that range, never a difference of running sums), so every exponent is <= 0.
Exclusive prefix / suffix sums come from loading g shifted by one row (the row before / after), not from
subtracting g from an inclusive sum (that cancels when one g is huge, e.g. -1e26).
"""
import triton
import triton.language as tl

# exp(-exp(60)) is exactly 0.0 in float32, as is the true decay of any larger w: the clamp changes no value and
# keeps g = -exp(w) finite (docs/math.md rule 4; engines/portable/chunked.py: W_MAX).
W_MAX = tl.constexpr(60.0)


@triton.jit
def log_decay(w):
    """g = -exp(min(w, W_MAX)) in float32 (<= 0, finite for any w)."""
    return -tl.exp(tl.minimum(w.to(tl.float32), W_MAX))


@triton.jit
def head_base(b, h, T, stride_t, N: tl.constexpr):
    """int64 offset of (b, t=0, h, 0) in a (B, T, H, N) tensor."""
    return b.to(tl.int64) * T * stride_t + h * N


@triton.jit
def row_base(base, t, stride_t):
    """int64 offset of row t (absolute) from the head's base."""
    return base + t.to(tl.int64) * stride_t


@triton.jit
def load_rows(ptr, base, rows, T, cols, stride_t):
    """(len(rows), len(cols)) float32 tile of rows `rows` (zero where row >= T or row < 0)."""
    ok = (rows >= 0) & (rows < T)
    offs = rows[:, None] * stride_t + cols[None, :]
    return tl.load((ptr + base) + offs, mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, base, rows, T, cols, stride_t, x):
    ok = rows < T
    offs = rows[:, None] * stride_t + cols[None, :]
    tl.store((ptr + base) + offs, x.to(ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def g_rows(w_ptr, base, rows, valid, T, cols, stride_t):
    """Tile of g at rows `rows`, 0 where not `valid` or outside [0, T) (a step with g = 0 has decay 1)."""
    ok = valid & (rows >= 0) & (rows < T)
    offs = rows[:, None] * stride_t + cols[None, :]
    w = tl.load((w_ptr + base) + offs, mask=ok[:, None], other=0.0)
    return tl.where(ok[:, None], log_decay(w), 0.0)


@triton.jit
def load_vec(ptr, base, t, T, cols, stride_t):
    """Row t as a float32 vector (zeros if t >= T)."""
    ok = (cols * 0 + t) < T
    return tl.load((ptr + base) + (t * stride_t + cols), mask=ok, other=0.0).to(tl.float32)


@triton.jit
def g_vec(w_ptr, base, t, T, cols, stride_t):
    """g at row t as a vector (0 if t >= T)."""
    ok = (cols * 0 + t) < T
    w = tl.load((w_ptr + base) + (t * stride_t + cols), mask=ok, other=0.0)
    return tl.where(ok, log_decay(w), 0.0)


@triton.jit
def block_decays(w_ptr, base, t0, T, cols, stride_t, C: tl.constexpr):
    """For the C rows t0 .. t0+C-1 (one sub-block), per key channel:

        E[t]  = sum_{t0 <= m < t} g_m        (exclusive prefix: pre_t = exp(E[t]))
        F[s]  = sum_{s < m < t0+C} g_m       (exclusive suffix: suf_s = exp(F[s]))
        tot   = sum_{t0 <= m < t0+C} g_m     (the whole sub-block: exp(tot))

    each a direct sum over its own range (all <= 0). Rows at or past T have g = 0 (decay 1).
    """
    idx = tl.arange(0, C)
    rows = t0 + idx
    E = tl.cumsum(g_rows(w_ptr, base, rows - 1, idx > 0, T, cols, stride_t), 0)
    g_next = g_rows(w_ptr, base, rows + 1, idx < C - 1, T, cols, stride_t)
    F = tl.cumsum(g_next, 0, reverse=True)
    tot = tl.sum(g_next, 0) + g_vec(w_ptr, base, t0, T, cols, stride_t)
    return E, F, tot


@triton.jit
def chunk_start_state(s0_ptr, states_ptr, bh, c, NC, has_s0, ik, jv, N: tl.constexpr):
    """State at the start of chunk c, rows ik x columns jv: s0 (or 0) for chunk 0, else states[bh, c - 1]
    (states holds the start states of chunks 1 .. NC-1, (B*H, NC-1, N, N))."""
    offs = ik[:, None] * N + jv[None, :]
    if c == 0:
        S = tl.load(s0_ptr + bh.to(tl.int64) * N * N + offs, mask=offs < has_s0 * N * N, other=0.0).to(tl.float32)
    else:
        S = tl.load(states_ptr + (bh.to(tl.int64) * (NC - 1) + c - 1) * N * N + offs).to(tl.float32)
    return S
