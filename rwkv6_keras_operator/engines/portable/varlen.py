"""Packed variable-length sequences in `keras.ops`: one row of T tokens holding n independent sequences.

The packed form re-cuts the tokens into chunks that never straddle a sequence boundary, and then runs the
chunked math of chunked.py unchanged on them, all sequences in one computation:

* Sequence i (tokens cu_seqlens[i]:cu_seqlens[i + 1]) gets ceil(len_i / L) chunks of its own; its last chunk is
  padded with steps that change nothing (r = k = v = 0, decay 1). The chunks of all sequences are laid side by
  side: at most NC = min(T, (T + n (L - 1)) // L) of them, a bound known while tracing (T and n are static),
  the unused ones all padding. Tokens move there and back by gathers (differentiable in every backend).
* Inside a chunk every pair (t, s) belongs to one sequence, so the binary tree of chunked.py applies as it is:
  every factor a product of decays over a contiguous range, <= 1, nothing exponentiated above 0.
* Across chunks, the state recurrence S <- tot * S + kv restarts at the first chunk of each sequence from that
  sequence's start state. The restart is folded into the recurrence the scan already runs: the step into a
  first chunk has decay 0 and adds the start state instead of the previous chunk's kv (a selection, not a
  subtraction: exact).
* Sequence i's final state is the end state of its last chunk (tot * S_start + kv); an empty sequence has no
  chunk and returns its start state.

The cost over the unpacked form is the padding of each sequence's last chunk: at most n (L - 1) tokens.
"""
import functools

import keras
from keras import ops

from ..shared import chunk_length
from .chunked import CHUNK, _tree_intra, log_decay, matmul
from .scan import chunk_states


def _layout(cu, T, n, L, NC):
    """Where the tokens go. cu: (n + 1,) int32 offsets.

    Returns, for the NC * L chunk positions, the token each holds (clipped to a valid index) and whether it holds
    one; per chunk, its sequence and whether it is the sequence's first; per sequence, its last chunk and whether
    it has any; per token, its chunk position."""
    starts, ends = cu[:-1], cu[1:]
    chunks_per_sequence = (ends - starts + (L - 1)) // L
    chunk_cu = ops.concatenate([ops.zeros((1,), "int32"), ops.cast(ops.cumsum(chunks_per_sequence), "int32")])
    chunk = ops.arange(NC, dtype="int32")
    # a chunk's sequence: how many sequences end (in chunks) at or before it; empty sequences are skipped
    seq_of_chunk = ops.minimum(ops.searchsorted(chunk_cu[1:], chunk, side="right"), n - 1)
    seq_of_chunk = ops.cast(seq_of_chunk, "int32")
    first_chunk = ops.take(chunk_cu, seq_of_chunk)
    used = chunk < chunk_cu[n]
    token_start = ops.take(starts, seq_of_chunk) + (chunk - first_chunk) * L
    token_count = ops.where(used, ops.clip(ops.take(ends, seq_of_chunk) - token_start, 0, L), 0)
    offset = ops.arange(L, dtype="int32")
    holds = offset[None, :] < token_count[:, None]                                        # (NC, L)
    token = ops.where(holds, token_start[:, None] + offset[None, :], 0)
    is_first = ops.logical_and(used, ops.equal(chunk, first_chunk))
    has_chunks = chunks_per_sequence > 0
    last_chunk = ops.maximum(chunk_cu[1:] - 1, 0)
    # a token's sequence: how many sequences end at or before it
    t = ops.arange(T, dtype="int32")
    seq_of_token = ops.cast(ops.searchsorted(ends, t, side="right"), "int32")
    position = ops.take(chunk_cu, seq_of_token) * L + t - ops.take(starts, seq_of_token)
    return (ops.reshape(token, (-1,)), ops.reshape(holds, (-1,)), seq_of_chunk, is_first, last_chunk, has_chunks,
            position)


def varlen_wkv(r, k, v, w, u, s0, cu_seqlens, chunk=CHUNK):
    """y and the n final states of n packed sequences.

    r, k, v, w: (1, T, H, N) with T static; u: (H, N); s0: (n, H, N, N) float32 start states or None (zeros);
    cu_seqlens: (n + 1,) ints of static length, 0 = cu_seqlens[0] <= ... <= cu_seqlens[n] = T (not checked here).
    Returns y (1, T, H, N) in r's dtype and the final states (n, H, N, N) float32."""
    _, T, H, N = r.shape
    n = cu_seqlens.shape[0] - 1
    if not isinstance(T, int) or not isinstance(n, int):
        raise ValueError("packed sequences need a static sequence length T and a static number of sequences")
    dtype = r.dtype
    exact = keras.backend.standardize_dtype(dtype) == "float32"
    L = chunk_length(T, chunk)
    NC = min(T, (T + n * (L - 1)) // L)
    cu = ops.cast(cu_seqlens, "int32")
    token, holds, seq_of_chunk, is_first, last_chunk, has_chunks, position = _layout(cu, T, n, L, NC)

    f32 = lambda x: ops.cast(x[0], "float32")  # noqa: E731
    r, k, v, d = f32(r), f32(k), f32(v), ops.exp(log_decay(w[0]))                   # (T, H, N)
    u = ops.cast(u, "float32")
    bonus = ops.sum(r * u * k, axis=-1, keepdims=True) * v

    def to_chunks(x, fill):  # (T, H, N) -> (H * NC, L, N), padding positions = fill
        x = ops.where(holds[:, None, None], ops.take(x, token, axis=0), fill)
        return ops.reshape(ops.transpose(ops.reshape(x, (NC, L, H, N)), (2, 0, 1, 3)), (-1, L, N))

    rc, kc, vc, dc = to_chunks(r, 0.0), to_chunks(k, 0.0), to_chunks(v, 0.0), to_chunks(d, 1.0)
    y_intra, pre, suf, tot = _tree_intra(rc, kc, vc, dc, exact)
    kv = matmul(ops.swapaxes(kc * suf, -1, -2), vc, exact)                                    # (H * NC, N, N)
    kv = ops.transpose(ops.reshape(kv, (H, NC, N, N)), (1, 0, 2, 3))                          # (NC, H, N, N)
    decay = ops.transpose(ops.reshape(tot, (H, NC, N, 1)), (1, 0, 2, 3))                      # (NC, H, N, 1)

    # the recurrence over chunks, restarted at every sequence's first chunk from its start state
    start_of_chunk = ops.zeros_like(kv) if s0 is None else ops.take(s0, seq_of_chunk, axis=0)
    restart = ops.concatenate([is_first[1:], ops.zeros((1,), "bool")])[:, None, None, None]   # into chunk c + 1
    step_decay = ops.where(restart, 0.0, decay)
    step_add = ops.where(restart, ops.concatenate([start_of_chunk[1:], start_of_chunk[:1]]), kv)
    _, s_starts = chunk_states(step_decay[:, None], step_add[:, None], start_of_chunk[:1])  # (NC, 1, H, N, N)
    s_starts = s_starts[:, 0]
    s_ends = decay * s_starts + kv

    s_read = ops.reshape(ops.transpose(s_starts, (1, 0, 2, 3)), (-1, N, N))
    y = y_intra + matmul(rc * pre, s_read, exact)                                             # (H * NC, L, N)
    y = ops.reshape(ops.transpose(ops.reshape(y, (H, NC * L, N)), (1, 0, 2)), (NC * L, H, N))
    y = ops.take(y, position, axis=0) + bonus

    finals = ops.take(s_ends, last_chunk, axis=0)
    if s0 is not None:
        finals = ops.where(has_chunks[:, None, None, None], finals, s0)
    else:
        finals = ops.where(has_chunks[:, None, None, None], finals, 0.0)
    return ops.cast(y, dtype)[None], finals


@functools.cache
def _compiled():
    # one jitted program under jax (inlined when the caller is itself traced), as for the unpacked engine
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(varlen_wkv, static_argnames="chunk")
    return varlen_wkv


def wkv_varlen(r, k, v, w, u, s0, cu_seqlens):
    """The engine entry for packed sequences (see varlen_wkv)."""
    return _compiled()(r, k, v, w, u, s0, cu_seqlens)
