"""The portable engine: `keras.ops` only, so it runs and trains under jax, torch and tensorflow on any device.

Differentiated by the backend's own autodiff (jax.grad, tf.GradientTape, torch.autograd).
"""
import functools

import keras

from .chunked import chunked_wkv
from .recurrent import pool_step, step_wkv  # noqa: F401  (pool_step: the engine protocol's)
from .varlen import wkv_varlen  # noqa: F401  (the engine protocol's)

NAME = "portable"
BACKEND = "any"


def is_available():
    return True


def supports(r, head_size):
    return True


def _wkv(r, k, v, w, u, s0):
    if r.shape[1] == 1:
        return step_wkv(r, k, v, w, u, s0)
    return chunked_wkv(r, k, v, w, u, s0)


@functools.cache
def _compiled():
    # Under jax, op-by-op dispatch of the ~150 small ops costs far more than the math; one jitted program (inlined
    # when the caller is itself being traced) costs what the math costs.
    if keras.backend.backend() == "jax":
        import jax

        from ...distributed.jax import time_parallel, time_sharding

        # several devices: inputs may be sharded along T too (distributed/jax.py)
        return jax.jit(time_parallel(_wkv) if time_sharding() else _wkv)
    return _wkv


def wkv(r, k, v, w, u, s0):
    return _compiled()(r, k, v, w, u, s0)
