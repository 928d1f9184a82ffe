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


def pool_step(r, k, v, w, u, pool, slots):
    """One token for the rows whose states are pool[slots]: the rows are gathered, stepped, and written back.

    r, k, v, w: (B, C) or (B, 1, C); u: (H, N) float32; pool: (n, H, N, N) float32; slots: (B,) ints, distinct.
    Returns y in r's shape and dtype, and the pool with the rows `slots` advanced: under torch the same tensor,
    updated in place (as the Triton engine does); under jax and tensorflow a new array (XLA updates a donated pool
    in place)."""
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():   # a step records no gradient: the pool would chain every step into one graph
            return _pool_step(r, k, v, w, u, pool, slots)
    return _pool_step(r, k, v, w, u, pool, slots)


def _pool_step(r, k, v, w, u, pool, slots):
    H, N = u.shape
    heads = (ops.shape(r)[0], 1, H, N)
    y, rows = step_wkv(*(ops.reshape(x, heads) for x in (r, k, v, w)), u, ops.take(pool, slots, axis=0))
    return ops.reshape(y, ops.shape(r)), scatter_rows(pool, slots, rows)


def scatter_rows(pool, slots, rows):
    """pool with pool[slots] = rows (slots distinct): in place under torch."""
    backend = keras.backend.backend()
    if backend == "torch":
        pool.index_copy_(0, slots.long(), rows)
        return pool
    if backend == "jax":
        return pool.at[slots].set(rows, unique_indices=True)
    return ops.scatter_update(pool, ops.expand_dims(slots, -1), rows)
