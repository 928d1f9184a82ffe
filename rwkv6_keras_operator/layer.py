"""RWKVKernelLayer: the operator as a Keras layer (functional models, mixed precision, saving)."""
from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from .operator import RWKVKernelOperator, TensorLike


@keras.saving.register_keras_serializable(package="rwkv6_keras_operator")
class RWKVKernelLayer(keras.layers.Layer):
    """The RWKV6 WKV operator as a Keras layer that owns the bonus `u`.

        layer = RWKVKernelLayer(head_size=64, with_state=True)
        y, state = layer(r, k, v, w, init_state=None, state_map=None, cu_seqlens=None)   # with_state=False: y

    Inputs r, k, v, w: (B, T, C) with C = H * head_size; `w` is the raw decay parameter (decay exp(-exp(w))).
    The layer creates one weight, `u` (H, head_size), on first call; it stays float32 (never autocast).

    Dtypes: r, k, v, w are cast to the layer's compute dtype (bfloat16 under the `mixed_bfloat16` policy) and
    y comes back in it. `init_state` ((n, H, N, N) or (H, N, N); see RWKVKernelOperator for n and
    `state_map`) is not cast by the policy, and the returned state (B, H, N, N) is always float32, so a state
    carried from call to call keeps full precision. `cu_seqlens` (packed sequences in a batch of one row; see
    RWKVKernelOperator) makes the start states and the returned state per sequence: (n_seq, H, N, N).

    Works on KerasTensors (functional models: `compute_output_spec`), round-trips through
    get_config/from_config and model.save/keras.models.load_model.

    Args:
        head_size: N, the size of one head.
        with_state: return (y, final state) instead of y.
        ops_loop: calls with T == 1 use the portable Keras-ops engine (see RWKVKernelOperator).
        u_initializer: initializer of `u` (default "zeros").
        **kwargs: Layer arguments (name, dtype policy, trainable, ...).
    """

    def __init__(self, head_size: int, with_state: bool = False, ops_loop: bool = False,
                 u_initializer: str | keras.initializers.Initializer = "zeros", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.operator = RWKVKernelOperator(head_size, ops_loop=ops_loop)
        self.head_size = head_size
        self.with_state = bool(with_state)
        self.ops_loop = bool(ops_loop)
        self.u_initializer = keras.initializers.get(u_initializer)
        # The policy must not cast init_state to bfloat16: inputs are cast in call() instead.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self._input_shape = None

    def _heads(self, shape):
        channels = shape[-1]
        if channels is None or channels % self.head_size:
            raise ValueError(f"The channel size of `r` ({channels}) must be a multiple of "
                             f"head_size ({self.head_size}).")
        return channels // self.head_size

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self._input_shape = tuple(input_shape)
        heads = self._heads(input_shape)
        self.u = self.add_weight(shape=(heads, self.head_size), initializer=self.u_initializer, dtype="float32",
                                 autocast=False, name="u")

    def get_build_config(self) -> dict[str, Any]:
        return {"input_shape": self._input_shape} if self._input_shape is not None else {}

    def call(self, r: TensorLike, k: TensorLike, v: TensorLike, w: TensorLike, init_state: TensorLike | None = None,
             state_map: TensorLike | Sequence[int] | None = None,
             cu_seqlens: TensorLike | Sequence[int] | None = None) -> TensorLike | tuple[TensorLike, TensorLike]:
        r, k, v, w = (ops.cast(x, self.compute_dtype) for x in (r, k, v, w))
        y, state = self.operator(r, k, v, w, self.u, with_state=self.with_state, init_state=init_state,
                                 state_map=state_map, cu_seqlens=cu_seqlens)
        return (y, state) if self.with_state else y

    def compute_output_spec(self, r: keras.KerasTensor, k: keras.KerasTensor, v: keras.KerasTensor,
                            w: keras.KerasTensor, init_state: keras.KerasTensor | None = None,
                            state_map: Any = None, cu_seqlens: Any = None
                            ) -> keras.KerasTensor | tuple[keras.KerasTensor, keras.KerasTensor]:
        y = keras.KerasTensor(r.shape, dtype=self.compute_dtype)
        if not self.with_state:
            return y
        heads = self._heads(r.shape)
        states = r.shape[0]   # one per row, or with cu_seqlens one per sequence
        if cu_seqlens is not None:
            offsets = cu_seqlens.shape[0] if hasattr(cu_seqlens, "shape") else len(cu_seqlens)
            states = None if offsets is None else offsets - 1
        return y, keras.KerasTensor((states, heads, self.head_size, self.head_size), dtype="float32")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "head_size": self.head_size, "with_state": self.with_state,
                "ops_loop": self.ops_loop, "u_initializer": keras.initializers.serialize(self.u_initializer)}
