"""The chunk-boundary states against a float64 loop, at chunk counts that hit every path of chunk_states
(tensorflow's blocked form: one group, one group plus padding, two levels of groups)."""
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator.engines.portable.scan import GROUP, chunk_states
from tests.helpers import FP32_OUT, rel_err


@pytest.mark.parametrize("nc", [1, GROUP, GROUP + 1, GROUP * GROUP + 5])
def test_chunk_states_match_the_recurrence(nc, rng):
    B, H, N = 2, 1, 4
    decay = rng.random((nc, B, H, N, 1)).astype(np.float32)
    decay[rng.random(decay.shape) < 0.2] = 0.0  # exact resets
    decay[rng.random(decay.shape) < 0.2] = 1.0  # exact keeps
    kv = rng.standard_normal((nc, B, H, N, N)).astype(np.float32)
    s0 = rng.standard_normal((B, H, N, N)).astype(np.float32)
    state, starts = s0.astype(np.float64), []
    for c in range(nc):
        starts.append(state)
        state = decay[c] * state + kv[c]
    last, got = chunk_states(*(ops.convert_to_tensor(x) for x in (decay, kv, s0)))
    assert rel_err(ops.convert_to_numpy(last), state) <= FP32_OUT
    assert rel_err(ops.convert_to_numpy(got), np.stack(starts)) <= FP32_OUT


@pytest.mark.requires("tensorflow")
def test_xla_compiles_the_gradient_and_it_is_right(rng):
    """Under tf.function(jit_compile=True) the gradient through the chunk states compiles (that of keras'
    scan does not) and equals the gradient of a plain eager loop."""
    import tensorflow as tf

    decay = tf.constant(rng.random((20, 1, 1, 4, 1)).astype(np.float32))
    kv = tf.constant(rng.standard_normal((20, 1, 1, 4, 4)).astype(np.float32))
    s0 = tf.constant(rng.standard_normal((1, 1, 4, 4)).astype(np.float32))

    def loss(states_fn, *x):
        last, starts = states_fn(*x)
        return tf.reduce_sum(last) + tf.reduce_sum(starts * starts)

    def loop(decay, kv, s0):
        state, starts = s0, []
        for c in range(decay.shape[0]):
            starts.append(state)
            state = decay[c] * state + kv[c]
        return state, tf.stack(starts)

    def grads(states_fn, *x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(states_fn, *x)
        return tape.gradient(value, x)

    got = tf.function(lambda *x: grads(chunk_states, *x), jit_compile=True)(decay, kv, s0)
    want = grads(loop, decay, kv, s0)
    for g, w in zip(got, want):
        assert rel_err(g.numpy(), w.numpy()) <= FP32_OUT
