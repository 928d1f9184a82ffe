"""Triton helpers shared by the kernels: products at a precision, the log-decay, tile loads, chunk start states.

Layout: r, k, v, w, y and their gradients are (B, T, H, N), contiguous, so row t of head h of batch row b starts
at ((b * T + t) * H + h) * N; the token stride is H * N. A kernel adds the int64 offset of its chunk's first row
to the pointer once (B * T * C may pass 2^31) and addresses rows relative to it in int32 (`base` below is that
int64 scalar, `rows` are chunk-relative and `T` counts the rows left from the chunk's start).
States are (B, H, N, N) float32 (S[i, j]: i the key channel, j the value channel).

Exactness (docs/math.md): every decay factor is exp(sum of g over a contiguous range), the sum taken directly
as a masked product on the tensor cores (masks.masked_sum, in the chunk kernels and the scan), never as a
difference of running sums (that cancels when one g is huge, e.g. -1e26), so every exponent is <= 0.
"""
import os
from typing import NamedTuple

import triton
import triton.language as tl

from .. import packed, shared

# The shared constants (engines/shared.py) as constexprs, the only globals a @triton.jit function may read.
G_ZERO = tl.constexpr(shared.G_ZERO)
W_MAX = tl.constexpr(shared.W_MAX)
LOG2E = tl.constexpr(shared.LOG2E)
# The columns of a packed call's chunk table (packed.ChunkTable.packed, (NC, 4) int32 a row per chunk).
START = tl.constexpr(packed.START)
COUNT = tl.constexpr(packed.COUNT)


class Varlen(NamedTuple):
    """The packed sequences of a call (B == 1, cu_seqlens), as the kernels read them: `chunks` the chunk table
    (NC, 4) int32 (packed.ChunkTable.packed); `sequences` (n, 2) int32, each sequence's first chunk and number of
    chunks (the scan walks a sequence's chunks)."""
    chunks: object
    sequences: object


def launch_chunks(T, L, varlen):
    """(chunk table or None, NC) of a chunk kernel's launch: no table and ceil(T / L) chunks, or varlen's table and
    its rows."""
    return (None, -(-T // L)) if varlen is None else (varlen.chunks, varlen.chunks.shape[0])


# Compiled kernels take exp as one instruction (`exp` below); the interpreter (TRITON_INTERPRET=1, read by triton when
# the kernels are defined, as here) runs no inline assembly.
FAST_EXP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").strip() != "1")


def precision_args(precisions, *names):
    """A shared.Precisions as a kernel's constexpr arguments, named as its fields in upper case (PREC, STATE_PREC,
    MASK_PREC, PIECES, DG_PIECES; precisions as their string values): all of them, or only `names` (for a kernel
    that takes fewer)."""
    args = {"PREC": precisions.prec.value, "STATE_PREC": precisions.state_prec.value,
            "MASK_PREC": precisions.mask_prec.value, "PIECES": precisions.pieces, "DG_PIECES": precisions.dg_pieces}
    return {n: v for n, v in args.items() if not names or n in names}


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b in float32. PREC, the value of a shared.Precision: "bf16" (operands rounded to bfloat16), or a tl.dot
    input_precision for float32 operands ("tf32", "tf32x3", "ieee"). The Triton engine never rounds to float16."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def exp(x):
    """exp(x) in float32. Compiled: one MUFU.EX2 on x * log2(e) (ex2.approx.ftz), the approximation tl.exp also
    uses, without the rescaling tl.exp adds around it for results below 2^-126: those flush to 0. Every exp here is
    a decay factor (exponent <= 0) or the log-decay's exp(w), for which a value below 2^-126 is 0 next to the
    terms it is added to (a decay d of the state, or g in a step's decay exp(g) = 1)."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * LOG2E], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def log_decay(w):
    """g = -exp(min(w, W_MAX)) in float32 (<= 0, finite for any w)."""
    return -exp(tl.minimum(w.to(tl.float32), W_MAX))


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
    return load_rows_cached(ptr, base, rows, T, cols, stride_t, "")


@triton.jit
def load_rows_cached(ptr, base, rows, T, cols, stride_t, CACHE: tl.constexpr):
    """load_rows with the load's cache_modifier CACHE (".cg" makes a second load of the same rows a load of its
    own, not merged with the first). Triton 3.6 does not accept a default value for a string constexpr."""
    valid = (rows >= 0) & (rows < T)
    offs = rows[:, None] * stride_t + cols[None, :]
    return tl.load((ptr + base) + offs, mask=valid[:, None], other=0.0, cache_modifier=CACHE).to(tl.float32)


@triton.jit
def store_rows(ptr, base, rows, T, cols, stride_t, x):
    valid = rows < T
    offs = rows[:, None] * stride_t + cols[None, :]
    tl.store((ptr + base) + offs, x.to(ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def g_rows(w_ptr, base, rows, selected, T, cols, stride_t):
    """Tile of g at rows `rows`, 0 where not `selected` or outside [0, T) (a step with g = 0 has decay 1)."""
    valid = selected & (rows >= 0) & (rows < T)
    offs = rows[:, None] * stride_t + cols[None, :]
    w = tl.load((w_ptr + base) + offs, mask=valid[:, None], other=0.0)
    return tl.where(valid[:, None], log_decay(w), 0.0)


@triton.jit
def chunk_rows(chunks_ptr, b, h, c, T, stride_t, N: tl.constexpr, L: tl.constexpr, VARLEN: tl.constexpr):
    """(base, rows): the int64 offset of chunk c's first row and the rows from there on. Fixed length: chunk c is rows
    c * L .. of batch row b; VARLEN (packed sequences, B == 1): row chunks[c, START] on, chunks[c, COUNT] rows (0 for
    an unused chunk), so rows past the chunk's sequence read as past the end."""
    head = head_base(b, h, T, stride_t, N)
    if VARLEN:
        start = tl.load(chunks_ptr + c * 4 + START)
        count = tl.load(chunks_ptr + c * 4 + COUNT)
    else:
        start = c * L
        count = T - c * L
    return row_base(head, start, stride_t), count


@triton.jit
def chunk_start_state(s0_ptr, states_ptr, bh, c, NC, kcols, vcols, N: tl.constexpr, HAS_S0: tl.constexpr,
                      HAS_STATES: tl.constexpr, VARLEN: tl.constexpr):
    """State at the start of chunk c, rows kcols x columns vcols: s0 for chunk 0 (zero without one: HAS_S0 False), else
    states[bh, c - 1] (states holds the start states of chunks 1 .. NC-1, (B*H, NC-1, N, N); none when NC == 1:
    HAS_STATES False). VARLEN: states[bh, c] (packed sequences: the start states of all NC chunks, (H, NC, N, N),
    each sequence's first one its start state)."""
    state_offs = kcols[:, None] * N + vcols[None, :]
    S = tl.zeros(state_offs.shape, dtype=tl.float32)
    if VARLEN:
        S = tl.load(states_ptr + (bh.to(tl.int64) * NC + c) * N * N + state_offs).to(tl.float32)
    elif c == 0:
        if HAS_S0:
            S = tl.load(s0_ptr + bh.to(tl.int64) * N * N + state_offs).to(tl.float32)
    else:
        if HAS_STATES:
            S = tl.load(states_ptr + (bh.to(tl.int64) * (NC - 1) + c - 1) * N * N + state_offs).to(tl.float32)
    return S
