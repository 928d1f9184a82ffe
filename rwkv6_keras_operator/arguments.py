"""Checking and normalising the operator's arguments.

Every check names the argument and what was expected. Shapes are checked wherever they are known (also while
tracing); the range of `state_map` is checked when its values are known, i.e. outside jax.jit, tf.function,
torch.compile and CUDA-graph capture.
"""
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

INPUT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Prepared:
    """Engine-ready arguments: r, k, v, w as (B, T, H, N); u (H, N) float32; s0 (B, H, N, N) float32 or None."""

    r: object
    k: object
    v: object
    w: object
    u: object
    s0: object
    shape: tuple  # (B, T, C) of the inputs


_DTYPE_NAMES = {}


def _dtype(x):
    """The dtype's Keras name ("float32", ...); memoised: standardize_dtype costs ~2 us, and a call needs ten."""
    name = _DTYPE_NAMES.get(x.dtype)
    if name is None:
        name = _DTYPE_NAMES[x.dtype] = keras.backend.standardize_dtype(x.dtype)
    return name


def _own_method(x):
    """True for torch tensors: keras.ops flattens its arguments looking for symbolic tensors, ~30 us a call under
    torch, while a decode step costs ~30 us on the GPU; a torch tensor reshapes and casts itself (also under
    torch.compile, where a shape may hold symbolic ints)."""
    return keras.backend.backend() == "torch" and not isinstance(x, keras.KerasTensor)


def to_tensor(x):
    """ops.convert_to_tensor, except for torch tensors already on a GPU (~7 us each saved): Keras would only move a
    tensor that is not on its device, and the GPU engines run where the inputs are."""
    if _own_method(x) and getattr(x, "is_cuda", False):
        return x
    return ops.convert_to_tensor(x)


def reshape(x, shape):
    return x.reshape(shape) if _own_method(x) else ops.reshape(x, shape)


def to_float32(x):
    return x.float() if _own_method(x) else ops.cast(x, "float32")


def _is_float(dtype):
    return "float" in dtype


def _values(x):
    """NumPy values of a backend tensor, or None while tracing (no host sync is forced there)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    elif backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif backend == "torch":
        import torch

        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
    return ops.convert_to_numpy(x)


def _inputs(head_size, r, k, v, w):
    tensors = {}
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w)):
        if x is None:
            raise TypeError(f"`{name}` is required: a (batch, time, channels) float tensor; got None.")
        dtype = _dtype(x) if hasattr(x, "dtype") else None   # as given: jax would make NumPy float64 float32
        x = to_tensor(x)
        if len(x.shape) != 3:
            raise ValueError(f"`{name}` must have shape (batch, time, channels); got shape {tuple(x.shape)}.")
        dtype = dtype or _dtype(x)
        if dtype not in INPUT_DTYPES:
            raise TypeError(f"`{name}` must be one of {', '.join(INPUT_DTYPES)}; got dtype {dtype}.")
        tensors[name] = x
    shape, dtype = tuple(tensors["r"].shape), _dtype(tensors["r"])
    for name in "kvw":
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"`{name}` must have the shape of `r`, {shape}; got {tuple(tensors[name].shape)}.")
        if _dtype(tensors[name]) != dtype:
            raise TypeError(f"`{name}` must have the dtype of `r`, {dtype}; got {_dtype(tensors[name])}.")
    B, T, C = shape
    if T is not None and T < 1:
        raise ValueError(f"`r` must hold at least one time step; got shape {shape}.")
    if C is None or C % head_size:
        raise ValueError(f"The channel size of `r` ({C}) must be a multiple of head_size ({head_size}).")
    return tensors, shape


def _float_tensor(name, x, expected):
    x = to_tensor(x)
    if not _is_float(_dtype(x)):
        raise TypeError(f"`{name}` must be a float tensor of shape {expected}; got dtype {_dtype(x)}.")
    return x


def _bonus(u, H, N):
    if u is None:
        raise TypeError(f"`u` is required: a float tensor of shape ({H}, {N}) or ({H * N},); got None.")
    u = _float_tensor("u", u, f"({H}, {N}) or ({H * N},)")
    if tuple(u.shape) not in ((H, N), (H * N,)):
        raise ValueError(f"`u` must have shape ({H}, {N}) or ({H * N},); got {tuple(u.shape)}.")
    return reshape(to_float32(u), (H, N))


def _start_state(init_state, state_map, batch, H, N):
    """(B, H, N, N) float32 start states from init_state and state_map, or None for zeros.

    batch: the batch size, an int or (tracing with an unknown batch) a scalar tensor."""
    B = batch if isinstance(batch, int) else None
    expected = f"(n, {H}, {N}, {N}) or ({H}, {N}, {N})"
    if init_state is None:
        if state_map is not None:
            raise ValueError("`state_map` was given without `init_state`: it maps rows to rows of init_state.")
        return None
    init_state = _float_tensor("init_state", init_state, expected)
    shape = tuple(init_state.shape)
    if len(shape) == 3:
        init_state, shape = ops.expand_dims(init_state, 0), (1, *shape)
    if len(shape) != 4 or shape[1:] != (H, N, N):
        raise ValueError(f"`init_state` must have shape {expected}; got {tuple(init_state.shape)}.")
    states = to_float32(init_state)
    n = shape[0]
    if state_map is None:
        if n == B or (B is None and n != 1):
            return states  # one per row (an unknown batch must then match n: checked by the engine's shapes)
        if n == 1:
            return ops.broadcast_to(states, (batch, H, N, N))
        raise ValueError(
            f"`init_state` holds {n} states for a batch of {B}: pass `state_map` (B ints in [0, {n})) to say "
            "which state each row starts from, or give 1 state (shared) or B states (one per row).")
    if isinstance(state_map, (list, tuple, np.ndarray)):
        state_map = np.asarray(state_map)
        if state_map.dtype.kind not in "iu":
            raise TypeError(f"`state_map` must hold integers; got dtype {state_map.dtype}.")
    else:
        state_map = ops.convert_to_tensor(state_map)
        if "int" not in _dtype(state_map):
            raise TypeError(f"`state_map` must hold integers; got dtype {_dtype(state_map)}.")
    if len(state_map.shape) != 1 or (B is not None and state_map.shape[0] not in (None, B)):
        raise ValueError(f"`state_map` must have shape ({B},) (one index per batch row); got {tuple(state_map.shape)}.")
    values = state_map if isinstance(state_map, np.ndarray) else _values(state_map)
    if values is not None and n is not None and values.size and (values.min() < 0 or values.max() >= n):
        raise ValueError(f"`state_map` values must lie in [0, {n}) (init_state holds {n} states); "
                         f"got values in [{values.min()}, {values.max()}].")
    return ops.take(states, ops.cast(state_map, "int32"), axis=0)


def prepare(head_size, r, k, v, w, u, init_state=None, state_map=None):
    tensors, (B, T, C) = _inputs(head_size, r, k, v, w)
    H, N = C // head_size, head_size
    batch, time = ops.shape(tensors["r"])[:2]  # ints, or scalar tensors for dims unknown while tracing
    return Prepared(
        *(reshape(tensors[name], (batch, time, H, N)) for name in "rkvw"),
        u=_bonus(u, H, N),
        s0=_start_state(init_state, state_map, batch, H, N),
        shape=(B, T, C),
    )
