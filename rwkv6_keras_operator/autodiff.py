"""Vector-Jacobian products through the active Keras backend's own autodiff (used by `check` and tests)."""
import keras
import numpy as np


def to_numpy(x):
    """A backend tensor as a float64 NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64)


def vjp(fn, args, cotangents):
    """Outputs of fn(*args) and the gradients of sum_i(out_i * cot_i) w.r.t. each of `args`.

    args: backend tensors; cotangents: NumPy arrays, one per output of fn (None: that output is unused).
    Returns (outputs, gradients) as float64 NumPy arrays (a gradient is None where none flowed).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        outs, pullback = jax.vjp(fn, *args)
        cots = tuple(jnp.zeros(o.shape, o.dtype) if c is None else jnp.asarray(c, o.dtype)
                     for o, c in zip(outs, cotangents))
        grads = pullback(cots)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            outs = fn(*args)
            loss = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32) * c)
                             for o, c in zip(outs, cotangents) if c is not None])
        grads = tape.gradient(loss, args)
    elif backend == "torch":
        import torch

        args = [a.detach().requires_grad_(True) for a in args]
        outs = fn(*args)
        loss = sum((o.float() * torch.as_tensor(c, dtype=torch.float32, device=o.device)).sum()
                   for o, c in zip(outs, cotangents) if c is not None)
        grads = torch.autograd.grad(loss, args, allow_unused=True)
    else:
        raise RuntimeError(f"no autodiff for the Keras backend {backend!r}")
    return [to_numpy(o) for o in outs], [None if g is None else to_numpy(g) for g in grads]
