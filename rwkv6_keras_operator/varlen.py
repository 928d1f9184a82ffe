"""Checking `cu_seqlens`, the offsets of packed variable-length sequences.

`cu_seqlens`: n + 1 ints (list, tuple, NumPy array or backend tensor), 0 = cu_seqlens[0] <= ... <= cu_seqlens[n] = T:
the T tokens of the one batch row hold n independent sequences, cu_seqlens[i]:cu_seqlens[i + 1] (empty ones
allowed). Its length and the sequence length T must be known while tracing (they bound the computation); its
values are checked whenever they are known, i.e. outside jax.jit, tf.function, torch.compile and graph capture.
"""
import numpy as np
from keras import ops

from .arguments import dtype_name, known_values


def check_cu_seqlens(cu_seqlens, shape):
    """cu_seqlens as an int32 backend tensor, and n, the number of sequences. shape: (B, T, C) of the inputs."""
    if isinstance(cu_seqlens, (list, tuple, np.ndarray)):
        cu_seqlens = np.asarray(cu_seqlens)
        if cu_seqlens.dtype.kind not in "iu":
            raise TypeError(f"`cu_seqlens` must hold integers; got dtype {cu_seqlens.dtype}.")
        values = cu_seqlens
    else:
        cu_seqlens = ops.convert_to_tensor(cu_seqlens)
        dtype = dtype_name(cu_seqlens)
        if "int" not in dtype:
            raise TypeError(f"`cu_seqlens` must hold integers; got dtype {dtype}.")
        values = None
    B, T, _ = shape
    if len(cu_seqlens.shape) != 1 or cu_seqlens.shape[0] is None or cu_seqlens.shape[0] < 2:
        raise ValueError("`cu_seqlens` must be n + 1 offsets (n >= 1 sequences) of a length known while tracing; "
                         f"got shape {tuple(cu_seqlens.shape)}.")
    if B != 1:
        raise ValueError(f"`cu_seqlens` packs sequences into one row: the inputs must have batch size 1; got {B}.")
    if T is None:
        raise ValueError("`cu_seqlens` needs a sequence length known while tracing; got an unknown time dimension.")
    if values is None:
        values = known_values(cu_seqlens)
    if values is not None:
        values = np.asarray(values)
        if values[0] != 0 or values[-1] != T:
            raise ValueError(f"`cu_seqlens` must start at 0 and end at T = {T} (the sequence length of the inputs); "
                             f"got first {values[0]}, last {values[-1]}.")
        if np.any(np.diff(values) < 0):
            i = int(np.argmax(np.diff(values) < 0))
            raise ValueError(f"`cu_seqlens` must be non-decreasing; got {values[i]} before {values[i + 1]} "
                             f"(positions {i}, {i + 1}).")
    return ops.cast(ops.convert_to_tensor(cu_seqlens), "int32"), cu_seqlens.shape[0] - 1
