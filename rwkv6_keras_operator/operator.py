"""The public operator: RWKVKernelOperator(head_size, max_sequence_length, ops_loop=False)."""
from __future__ import annotations

from typing import Any, Sequence

from keras import ops

from . import engines
from .arguments import (apply, bonus, convert, eager_torch_plan, plan, reshape, sequence_start_states,
                        start_state)
from .pool_arguments import prepare_step
from .varlen import check_cu_seqlens

TensorLike = Any   # a tensor of the active backend, a NumPy array, or a KerasTensor inside a functional model


class RWKVKernelOperator:
    """The RWKV6 ("Finch") WKV operator for Keras 3, under the jax, torch or tensorflow backend.

    Per head, with the state S (N x N, key x value) read before each step and then updated:

        y_t = r_t @ (diag(u) k_t v_t^T + S),    S <- diag(exp(-exp(w_t))) S + k_t v_t^T

    Args:
        head_size: N, the size of one head; the channel count C of the inputs is H * N.
        max_sequence_length: accepted for compatibility with rwkv6-keras-operator 1.0; unused (there is no
            length limit).
        ops_loop: if True, calls with a single time step (T == 1) run the portable Keras-ops engine.

    Call: `op(r, k, v, w, u, with_state=False, init_state=None, state_map=None, cu_seqlens=None)
           -> (y, state or None)`
        r, k, v, w: (B, T, C), one float dtype (float32, bfloat16 or float16); w is the raw decay parameter.
        u: (H, N) or (C,), any float dtype.
        init_state: (n, H, N, N) or (H, N, N); the start state of each row: n == 1 is shared by all rows,
            n == B gives one per row, any n works with state_map. Used whenever given, also with
            with_state=False. Gradients flow to it.
        state_map: B ints (list, NumPy or backend tensor): row b starts from init_state[state_map[b]].
        cu_seqlens: packed sequences; n_seq + 1 int offsets (list, NumPy or backend tensor),
            0 = cu_seqlens[0] <= ... <= cu_seqlens[n_seq] = T, for inputs of batch size B = 1: the T tokens hold
            n_seq independent sequences, cu_seqlens[i]:cu_seqlens[i + 1] (empty ones allowed). Start states and
            returned states are then per sequence: init_state holds n_seq states, 1 (shared), or any number
            with a state_map of n_seq indices. Its length must be known while tracing (a traced tensor works
            under jax.jit, tf.function, torch.compile); its values are checked when known (eagerly). Such calls
            run the engine's own packed kernels (Triton, Pallas; the portable engine elsewhere).
        Returns y (B, T, C) in the dtype of r, and with_state=True the float32 state after the last step,
            (B, H, N, N) (with cu_seqlens: (n_seq, H, N, N), each sequence's own; an empty one's is its start
            state), else None.

    Step: `op.step(r, k, v, w, u, pool, slots) -> (y, pool)`: one token for rows whose states live in a pool of
    states (serving many requests, each holding a slot); see `step`.

    The object holds no mutable state: one instance may be called from several threads.
    """

    def __init__(self, head_size: int, max_sequence_length: int | None = None, ops_loop: bool = False) -> None:
        if not isinstance(head_size, int) or isinstance(head_size, bool) or head_size < 1:
            raise ValueError(f"`head_size` must be a positive int; got {head_size!r}.")
        self.head_size = head_size
        self.max_sequence_length = max_sequence_length
        self.ops_loop = bool(ops_loop)

    def __call__(self, r: TensorLike, k: TensorLike, v: TensorLike, w: TensorLike, u: TensorLike,
                 with_state: bool = False, init_state: TensorLike | None = None,
                 state_map: TensorLike | Sequence[int] | None = None,
                 cu_seqlens: TensorLike | Sequence[int] | None = None) -> tuple[TensorLike, TensorLike | None]:
        if cu_seqlens is not None:
            return self._packed(r, k, v, w, u, with_state, init_state, state_map, cu_seqlens)
        p = None if state_map is not None else eager_torch_plan(self.head_size, r, k, v, w, u, init_state)
        if p is None:
            r, k, v, w, u, init_state, state_map = convert(r, k, v, w, u, init_state, state_map)
            p = plan(self.head_size, r, k, v, w, u, init_state, state_map)
        engine = engines.select(r, self.head_size, self.ops_loop)
        decode = getattr(engine, "decode", None) if p.shape[1] == 1 else None
        if decode is not None:   # one token: an engine that takes (B, 1, C) as it is (no reshapes)
            y, state = decode(r, k, v, w, bonus(p, u), start_state(p, r, init_state, state_map))
        else:
            a = apply(p, r, k, v, w, u, init_state, state_map)
            y, state = engine.wkv(a.r, a.k, a.v, a.w, a.u, a.s0)
            y = reshape(y, ops.shape(r) if p.shape[0] is None or p.shape[1] is None else p.shape)
        return y, (state if with_state else None)

    def _packed(self, r, k, v, w, u, with_state, init_state, state_map, cu_seqlens):
        """A call with cu_seqlens: the inputs' plan is made without start states, which are per sequence here."""
        r, k, v, w, u, init_state, state_map = convert(r, k, v, w, u, init_state, state_map)
        p = plan(self.head_size, r, k, v, w, u)
        cu, n = check_cu_seqlens(cu_seqlens, p.shape)
        s0 = sequence_start_states(p, init_state, state_map, n)
        a = apply(p, r, k, v, w, u)
        engine = engines.select(r, self.head_size, self.ops_loop)
        wkv_varlen = getattr(engine, "wkv_varlen", None) or engines.portable_engine().wkv_varlen
        y, states = wkv_varlen(a.r, a.k, a.v, a.w, a.u, s0, cu)
        return reshape(y, p.shape), (states if with_state else None)

    def step(self, r: TensorLike, k: TensorLike, v: TensorLike, w: TensorLike, u: TensorLike, pool: TensorLike,
             slots: TensorLike | Sequence[int]) -> tuple[TensorLike, TensorLike]:
        """One token for B rows whose states live in a pool: `y, pool = op.step(r, k, v, w, u, pool, slots)`.

        r, k, v, w: (B, C) or (B, 1, C), one float dtype; u: (H, N) or (C,), as in the call; pool: (n, H, N, N)
        float32, n states of which row b uses pool[slots[b]]; slots: B distinct ints in [0, n) (list, NumPy or
        backend tensor). Advances the rows `slots` of the pool by one token and returns y (in r's shape and dtype)
        and the pool; every other state of the pool is untouched. The values of slots are checked when they are
        known (see pool_arguments.py); no gradient flows through a step.

        torch: the pool is updated in place and returned (the same tensor); the Triton engine reads and writes the
        rows where they lie, also inside CUDA-graph capture (pass slots as a CUDA tensor there). jax: functional;
        inside a jitted step with the pool donated (or carried through a loop) XLA updates it in place, eagerly it
        copies the pool first. tensorflow: functional.
        """
        a = prepare_step(self.head_size, r, k, v, w, u, pool, slots)
        engine = engines.portable_engine() if self.ops_loop else engines.select(a.r, self.head_size, False)
        pool_step = getattr(engine, "pool_step", None) or engines.portable_engine().pool_step
        return pool_step(a.r, a.k, a.v, a.w, a.u, a.pool, a.slots)

    def __repr__(self) -> str:
        return (f"RWKVKernelOperator(head_size={self.head_size}, "
                f"max_sequence_length={self.max_sequence_length}, ops_loop={self.ops_loop})")
