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

from .. import packed
from ..shared import chunk_length
from .chunked import CHUNK, _tree_intra, log_decay, matmul
from .scan import chunk_states


def _slots(table, L):
    """For the NC * L chunk positions: the token each holds (clipped to a valid index) and whether it holds one."""
    offset = ops.arange(L, dtype="int32")
    holds = offset[None, :] < table.count[:, None]                                        # (NC, L)
    token = ops.where(holds, table.start[:, None] + offset[None, :], 0)
    return ops.reshape(token, (-1,)), ops.reshape(holds, (-1,))


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
    table = packed.chunk_table(cu_seqlens, T, n, L)
    NC = table.start.shape[0]
    token, holds = _slots(table, L)
    seq_of_chunk, is_first = table.sequence, table.first

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
    y = ops.take(y, packed.token_positions(cu_seqlens, T, L), axis=0) + bonus
    return ops.cast(y, dtype)[None], packed.final_states(s_ends, table, s0)


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
