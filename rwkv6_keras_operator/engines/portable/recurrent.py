"""One step of the WKV recurrence in `keras.ops` (T == 1: generation with a carried state)."""
import keras
from keras import ops

from .chunked import log_decay, matmul


def step_wkv(r, k, v, w, u, s0):
    """r, k, v, w: (B, 1, H, N); u: (H, N); s0: (B, H, N, N) float32 or None. Returns y (B, 1, H, N), state."""
    dtype = r.dtype
    exact = keras.backend.standardize_dtype(dtype) == "float32"
    r, k, v = (ops.cast(x[:, 0], "float32") for x in (r, k, v))
    kv = k[..., :, None] * v[..., None, :]                          # (B, H, N, N)
    state = ops.cast(u, "float32")[..., None] * kv
    if s0 is None:  # a zero start state: nothing to read, nothing to decay
        y, s1 = read(r, state, exact), kv
    else:
        y = read(r, state + s0, exact)
        s1 = ops.exp(log_decay(w[:, 0]))[..., None] * s0 + kv
    return ops.cast(y[:, None], dtype), s1


def read(r, state, exact):
    """y_j = sum_i r_i state_ij: (B, H, N) x (B, H, N, N) -> (B, H, N)."""
    return matmul(r[..., None, :], state, exact)[..., 0, :]
