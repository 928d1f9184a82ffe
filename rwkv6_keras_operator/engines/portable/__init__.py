"""The portable engine: `keras.ops` only, so it runs and trains under jax, torch and tensorflow on any device.

Differentiated by the backend's own autodiff (jax.grad, tf.GradientTape, torch.autograd).
"""
from .chunked import chunked_wkv
from .recurrent import step_wkv

NAME = "portable"
BACKEND = "any"


def is_available():
    return True


def supports(r, head_size):
    return True


def wkv(r, k, v, w, u, s0):
    if r.shape[1] == 1:
        return step_wkv(r, k, v, w, u, s0)
    return chunked_wkv(r, k, v, w, u, s0)
