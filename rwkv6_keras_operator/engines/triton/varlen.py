"""The tables of packed sequences (cu_seqlens) on the device, in two small launches: the values of
packed.chunk_table (docs/math.md, "Packed sequences"), which builds them from some forty tensor ops, each a launch of
its own; here they cost two.

    sequences (n, 2) int32: the first chunk and the number of chunks of each sequence (ceil(len_i / L));
    chunks (NC, 4) int32: packed.ChunkTable.packed, a row per chunk: start, count, sequence, flags (FIRST | LAST).

`sequence_table_kernel` (one program) runs the cumulative sum of the chunk counts over the sequences, a block at a
time, and `chunk_table_kernel` finds each chunk's sequence by a binary search in the cumulative counts.
"""
import torch
import triton
import triton.language as tl

from .. import packed
from .common import Varlen

FIRST = tl.constexpr(packed.FIRST)
LAST = tl.constexpr(packed.LAST)
BLOCK = 1024   # sequences (and chunks) a block


@triton.jit
def sequence_table_kernel(cu_ptr, sequences_ptr, chunk_end_ptr, n, L: tl.constexpr, BLOCK: tl.constexpr):
    """sequences[i] = (first chunk, chunks) and chunk_end[i] = first chunk + chunks of each sequence i < n."""
    carry = tl.full([], 0, tl.int32)
    for first in range(0, n, BLOCK):
        seq = first + tl.arange(0, BLOCK)
        valid = seq < n
        length = tl.load(cu_ptr + seq + 1, mask=valid, other=0) - tl.load(cu_ptr + seq, mask=valid, other=0)
        chunks = (length + (L - 1)) // L
        end = carry + tl.cumsum(chunks, 0)
        tl.store(sequences_ptr + 2 * seq, end - chunks, mask=valid)
        tl.store(sequences_ptr + 2 * seq + 1, chunks, mask=valid)
        tl.store(chunk_end_ptr + seq, end, mask=valid)
        carry += tl.sum(chunks, 0)


@triton.jit
def chunk_table_kernel(cu_ptr, sequences_ptr, chunk_end_ptr, chunks_ptr, n, NC, T, L: tl.constexpr,
                       STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """The rows of chunks c of this program's block: the sequence of chunk c is the first i with chunk_end[i] > c
    (STEPS = bit length of n halvings find it), n - 1 for the chunks past the last used one (as packed.chunk_table)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + n
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        before = tl.load(chunk_end_ptr + mid, mask=active, other=0) <= c
        lo = tl.where(active & before, mid + 1, lo)
        hi = tl.where(active & (~before), mid, hi)
    seq = tl.minimum(lo, n - 1)
    used = c < tl.load(chunk_end_ptr + n - 1)
    first_chunk = tl.load(sequences_ptr + 2 * seq)
    start = tl.load(cu_ptr + seq) + (c - first_chunk) * L
    count = tl.where(used, tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1) - start, 0), L), 0)
    first = used & (c == first_chunk)
    last = used & (c + 1 == tl.load(chunk_end_ptr + seq))
    flags = tl.where(first, FIRST, 0) + tl.where(last, LAST, 0)
    valid = c < NC
    tl.store(chunks_ptr + 4 * c, tl.where(used, start, T), mask=valid)
    tl.store(chunks_ptr + 4 * c + 1, count, mask=valid)
    tl.store(chunks_ptr + 4 * c + 2, seq, mask=valid)
    tl.store(chunks_ptr + 4 * c + 3, flags, mask=valid)


def varlen_tables(cu_seqlens, T, L):
    """The common.Varlen of cu_seqlens ((n + 1,) int32 on the kernels' device, 0 = cu[0] <= ... <= cu[n] = T; not
    checked here) for chunks of L: NC = packed.max_chunks(T, n, L) rows of chunks."""
    n = cu_seqlens.shape[0] - 1
    NC = packed.max_chunks(T, n, L)
    cu = cu_seqlens.to(torch.int32).contiguous()
    sequences = torch.empty((n, 2), dtype=torch.int32, device=cu.device)
    chunk_end = torch.empty((n,), dtype=torch.int32, device=cu.device)
    chunks = torch.empty((NC, 4), dtype=torch.int32, device=cu.device)
    block = min(BLOCK, max(16, triton.next_power_of_2(max(n, NC))))
    sequence_table_kernel[(1,)](cu, sequences, chunk_end, n, L=L, BLOCK=block)
    chunk_table_kernel[(triton.cdiv(NC, block),)](cu, sequences, chunk_end, chunks, n, NC, T, L=L,
                                                  STEPS=n.bit_length(), BLOCK=block)
    return Varlen(chunks, sequences)
