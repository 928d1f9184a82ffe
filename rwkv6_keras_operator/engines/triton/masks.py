"""Masks over the rows of one block of C = 2^LOG_C rows, and the exact masked sums over them (docs/math.md, "The
binary tree inside a chunk"). Every mask is [row, column] over the C rows.

A masked sum is the product of a 0/1 mask with x cut into bfloat16 pieces (`exact_product`): each product is exact,
the sum float32, so a masked sum of g over a contiguous range is the direct sum of rule 1 (no difference of running
sums, no cancellation). The mask formulas are tested entry by entry against tests/mask_definitions.py.
"""
import triton
import triton.language as tl

from .common import mm


@triton.jit
def in_range(C: tl.constexpr, lo, hi, ROWS: tl.constexpr):
    """[C x C] mask: ROWS: row i holds the columns lo[i] <= j < hi[i]; else column j holds the rows lo[j] <= i < hi[j]
    (each compare is one instruction against a per-row / per-column bound)."""
    i = tl.arange(0, C)
    if ROWS:
        return (i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])
    else:
        return (i[:, None] >= lo[None, :]) & (i[:, None] < hi[None, :])


@triton.jit
def before_mask(C: tl.constexpr, shift):
    """[t, m]: m comes before t inside t's block of 2^shift rows (shift = LOG_C: the whole sub-block)."""
    t = tl.arange(0, C)
    return in_range(C, (t >> shift) << shift, t, True)


@triton.jit
def after_mask(C: tl.constexpr, shift):
    """[t, m]: m comes after t inside t's block of 2^shift rows."""
    t = tl.arange(0, C)
    return in_range(C, t + 1, ((t >> shift) + 1) << shift, True)


@triton.jit
def pair_mask(C: tl.constexpr, shift):
    """[t, s]: the pairs of level 2^shift: t in the lower, s in the upper half of one block of 2^(shift+1) rows."""
    t = tl.arange(0, C)
    lo = (t >> (shift + 1)) << (shift + 1)
    return in_range(C, lo, tl.where(((t >> shift) & 1) == 1, lo + (1 << shift), lo), True)


@triton.jit
def span_bounds(C: tl.constexpr, shift):
    """[lo_q, hi_q): the rows m whose d_m row q's level-2^shift factor holds: in q's own h-block, before q where q
    lies in a lower half (q is a later member t: pre_h) and after q where it lies in an upper half (an earlier
    member s: suf_h)."""
    q = tl.arange(0, C)
    blk = (q >> shift) << shift
    lower = ((q >> shift) & 1) == 1
    return tl.where(lower, blk, q + 1), tl.where(lower, q, blk + (1 << shift))


@triton.jit
def factor_mask(C: tl.constexpr, shift):
    """[q, m]: row q's level-2^shift factor holds d_m (the range of g summed into F_h, levels.level_factor)."""
    lo, hi = span_bounds(C, shift)
    return in_range(C, lo, hi, True)


@triton.jit
def span_mask(C: tl.constexpr, shift):
    """[m, q]: the level-2^shift term of row q holds d_m (factor_mask transposed: the mask that gathers a level's
    part of dg)."""
    lo, hi = span_bounds(C, shift)
    return in_range(C, lo, hi, False)


@triton.jit
def exact_product(m, x, X_FIRST: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """m @ x (X_FIRST: x^T @ m) for a 0/1 matrix m, with x cut into PIECES bfloat16 pieces hi + mid + lo (24 bits
    of x with 3 pieces, 16 with 2, 8 with 1): every product is exact (0 or 1 times a bfloat16 value), so each entry is
    the float32 sum of exactly the selected terms, smallest piece first."""
    hi = x.to(tl.bfloat16).to(tl.float32)
    if PIECES == 1:
        out = piece_product(m, hi, X_FIRST, MASK_PREC)
    else:
        rest = x - hi
        mid = rest.to(tl.bfloat16).to(tl.float32)
        if PIECES == 3:
            low = piece_product(m, (rest - mid).to(tl.bfloat16).to(tl.float32), X_FIRST, MASK_PREC) + \
                piece_product(m, mid, X_FIRST, MASK_PREC)
        else:
            low = piece_product(m, mid, X_FIRST, MASK_PREC)
        out = low + piece_product(m, hi, X_FIRST, MASK_PREC)
    return out


@triton.jit
def piece_product(m, piece, X_FIRST: tl.constexpr, MASK_PREC: tl.constexpr):
    if X_FIRST:
        return mm(tl.trans(piece), m, MASK_PREC)
    else:
        return mm(m, piece, MASK_PREC)


@triton.jit
def mask_operand(mask, MASK_PREC: tl.constexpr):
    """A boolean mask as the 0/1 first operand of a masked product."""
    if MASK_PREC == "bf16":
        return tl.where(mask, 1.0, 0.0).to(tl.bfloat16)     # straight to the product's operand type
    else:
        return mask.to(tl.float32)


@triton.jit
def masked_sum(mask, x, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """sum_m mask[t, m] x[m, :] for a 0/1 mask, exact in pieces (exact_product)."""
    return exact_product(mask_operand(mask, MASK_PREC), x, False, PIECES, MASK_PREC)


# The level table (Settings.mask_table): factor_mask and span_mask of every level h = 2^shift, shift = 1 .. LOG_C - 1,
# as bfloat16 0/1 matrices, (LOG_C - 1, 2, C, C), written once per device and sub-block size by level_table_kernel from
# the functions above. A chunk kernel then loads a level's masks (the same 4 KB at C = 32 for every program, from L1)
# instead of building them from their row bounds in every warp.
FACTOR = tl.constexpr(0)
SPAN = tl.constexpr(1)


@triton.jit
def level_table_kernel(levels_ptr, C: tl.constexpr):
    """One program a level: its factor and span masks."""
    i = tl.arange(0, C)
    offs = i[:, None] * C + i[None, :]
    level = levels_ptr + tl.program_id(0) * 2 * C * C
    shift = tl.program_id(0) + 1
    tl.store(level + FACTOR * C * C + offs, mask_operand(factor_mask(C, shift), "bf16"))
    tl.store(level + SPAN * C * C + offs, mask_operand(span_mask(C, shift), "bf16"))


@triton.jit
def level_mask(levels_ptr, shift, KIND: tl.constexpr, C: tl.constexpr, MASK_PREC: tl.constexpr,
               MASK_TABLE: tl.constexpr):
    """The 0/1 operand of level 2^shift's factor_mask (KIND FACTOR) or span_mask (KIND SPAN): loaded from the level
    table (MASK_TABLE) or built here."""
    if MASK_TABLE:
        i = tl.arange(0, C)
        m = tl.load(levels_ptr + ((shift - 1) * 2 + KIND) * C * C + i[:, None] * C + i[None, :])
        if MASK_PREC != "bf16":
            m = m.to(tl.float32)
    elif KIND == FACTOR:
        m = mask_operand(factor_mask(C, shift), MASK_PREC)
    else:
        m = mask_operand(span_mask(C, shift), MASK_PREC)
    return m


_TABLES = {}


def level_table(C, device):
    """The level table for sub-blocks of C rows on `device` (a torch tensor, made at the first call and kept)."""
    key = (C, str(device))
    table = _TABLES.get(key)
    if table is None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("Settings.mask_table: the level table is written by a kernel of its own at the first "
                               "call on a device, which a CUDA graph capture would only record; make one call "
                               "before capturing")
        levels = C.bit_length() - 2                # shift = 1 .. LOG_C - 1 (Settings: C >= 16)
        table = torch.empty((levels, 2, C, C), dtype=torch.bfloat16, device=device)
        level_table_kernel[(levels,)](table, C=C)
        _TABLES[key] = table
    return table


def level_table_for(settings, device):
    """The level table a chunk kernel reads with settings.mask_table (settings.Settings), else None."""
    return level_table(settings.sub_block, device) if settings.mask_table else None


@triton.jit
def column_sums(x, R: tl.constexpr, BV: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr):
    """(columns of x, BV) tile whose row i holds sum_t x[t, i] (over the R rows of x) in every column: x^T times
    ones, exact in pieces (exact_product), so the result is in the layout of a product (no reduction across
    warps)."""
    return exact_product(tl.full([R, BV], 1.0, tl.float32), x, True, PIECES, MASK_PREC)
