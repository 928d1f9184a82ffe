"""Training RWKV6: gradients to every weight and to the start states on every backend (checked against finite
differences), model.fit lowering the loss, and state tuning (weights frozen, start states trained) whose
exported time_state checkpoint gives the official runtime this model's logits."""
import keras
import numpy as np
import pytest

from rwkv6_keras_operator.models import RWKV6, RWKV6Config
from rwkv6_keras_operator.models.checkpoint import random_weights

from .tolerances import FP32, rel_err, to_numpy

TINY = RWKV6Config(vocab_size=97, n_embd=32, n_layer=2, head_size=16, dim_ffn=64, mix_lora=2, decay_lora=4)


def tiny_model(dtype=None, seed=0):
    model = RWKV6(TINY, dtype=dtype)
    model.load_checkpoint_weights(random_weights(TINY, seed=seed))
    return model


def repeating_data(rows, length, seed=0):
    """Rows of a short random pattern repeated: learnable from context, so the loss can fall fast."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, TINY.vocab_size, (rows, 5))
    data = np.tile(pattern, (1, length // 5 + 2))[:, :length + 1].astype(np.int32)
    return data[:, :-1], data[:, 1:]


def mean_loss(logits, targets):
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))


def loss_and_gradients(model, tokens, targets):
    """(loss, [gradient of each trainable variable]) through the backend's autodiff."""
    variables = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        others = [v.value for v in model.non_trainable_variables]

        def loss_fn(values):
            logits, _ = model.stateless_call(values, others, tokens)
            return mean_loss(logits, targets)

        loss, grads = jax.value_and_grad(loss_fn)([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = mean_loss(model(tokens), targets)
        grads = tape.gradient(loss, [v.value for v in variables])
    else:
        loss = mean_loss(model(tokens), targets)
        loss.backward()
        grads = [v.value.grad for v in variables]
        for v in variables:
            v.value.grad = None
    return float(to_numpy(loss)), [None if g is None else to_numpy(g) for g in grads]


def test_gradients_reach_every_weight_and_the_start_states():
    model = tiny_model()
    model.set_trainable(weights=True, start_states=True)
    tokens, targets = repeating_data(2, 13)
    loss, grads = loss_and_gradients(model, tokens, targets)
    names = [v.path for v in model.trainable_variables]
    assert len(names) == len(model.variables)
    for name, grad in zip(names, grads):
        assert grad is not None and np.all(np.isfinite(grad)), name
        assert np.any(grad != 0), name
    # the derivative along the gradient (its norm, the largest one: float32 losses resolve it) against central
    # differences, for the start states, a mix, the decay LoRA and u
    for name in ("block_0/att/time_state", "block_1/att/time_maa_w", "block_0/att/time_decay_w2",
                 "block_1/att/time_faaaa"):
        index = next(i for i, n in enumerate(names) if n.endswith(name))
        variable, grad = model.trainable_variables[index], grads[index]
        base = to_numpy(variable)
        direction = grad / np.linalg.norm(grad)
        step = 1e-2 * max(np.linalg.norm(base), 1.0)
        losses = []
        for sign in (1, -1):
            variable.assign((base + sign * step * direction).astype(np.float32))
            losses.append(float(to_numpy(mean_loss(model(tokens), targets))))
        variable.assign(base.astype(np.float32))
        numeric = (losses[0] - losses[1]) / (2 * step)
        assert abs(numeric - np.linalg.norm(grad)) <= 1e-2 * np.linalg.norm(grad), (name, numeric, grad)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fit_lowers_the_loss(dtype):
    if dtype != "float32" and keras.backend.backend() != "jax":
        pytest.skip("the mixed_bfloat16 policy is tested under jax only on CPU (one compile is enough)")
    model = tiny_model(dtype=dtype)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    tokens, targets = repeating_data(8, 20)
    before = model.evaluate(tokens, targets, verbose=0)
    model.fit(tokens, targets, batch_size=4, epochs=6, verbose=0)
    after = model.evaluate(tokens, targets, verbose=0)
    assert after < 0.8 * before, (before, after)
    assert model.blocks[0].att.key.kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(model(tokens).dtype) == "float32"


def test_state_tuning_trains_only_the_start_states_and_exports_them(tmp_path, official):
    model = tiny_model(seed=2)
    model.set_trainable(weights=False, start_states=True)
    assert [v.path for v in model.trainable_variables] == [v.path for v in model.start_states]
    weights_before = [to_numpy(v) for v in model.variables if not v.path.endswith("time_state")]
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    tokens, targets = repeating_data(4, 15, seed=3)
    tokens, targets = tokens[:1].repeat(4, 0), targets[:1].repeat(4, 0)    # one pattern: a state can hold it
    before = model.evaluate(tokens, targets, verbose=0)
    model.fit(tokens, targets, batch_size=4, epochs=15, verbose=0)
    after = model.evaluate(tokens, targets, verbose=0)
    assert after < 0.9 * before, (before, after)
    for before_value, v in zip(weights_before, [v for v in model.variables if not v.path.endswith("time_state")]):
        np.testing.assert_array_equal(to_numpy(v), before_value, err_msg=v.path)
    path = model.save_checkpoint(str(tmp_path / "tuned.pth"))
    results = official([{"checkpoint": path, "sequences": [[tokens[0].tolist()]]}])[0]
    assert rel_err(to_numpy(model(tokens[:1]))[0], results[0]["logits"][0]) < FP32
