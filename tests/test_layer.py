"""RWKVKernelLayer on the active backend: functional models, mixed_bfloat16, config and saving round trips."""
import keras
import numpy as np
import pytest

from rwkv6_keras_operator import RWKVKernelLayer
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BF16, FP32_GRAD, FP32_OUT, bf16_round, make_inputs, rel_err, to_numpy

B, T, H, N = 2, 37, 2, 16
C = H * N


@pytest.fixture
def data():
    inputs = make_inputs(B, T, H, N, seed=5, decay="masks", n_state=B)
    inputs["u"] = inputs["u"] * 2.0
    return inputs


def _layer_with_u(u, **kwargs):
    layer = RWKVKernelLayer(N, **kwargs)
    layer.build((None, None, C))
    layer.u.assign(u)
    return layer


def _functional_model(policy=None):
    """A functional model: four (T, C) inputs and an (H, N, N) init_state; outputs y and the final state."""
    rkvw = [keras.Input((None, C), name=name) for name in "rkvw"]
    s0 = keras.Input((H, N, N), name="init_state")
    y, state = RWKVKernelLayer(N, with_state=True, dtype=policy, name="wkv")(*rkvw, init_state=s0)
    return keras.Model([*rkvw, s0], [y, state])


def _feed(data):
    return [data[name] for name in "rkvw"] + [data["init_state"]]


def test_symbolic_functional_model_matches_oracle(data):
    model = _functional_model()
    y_spec, s_spec = model.outputs
    assert tuple(y_spec.shape) == (None, None, C) and y_spec.dtype == "float32"
    assert tuple(s_spec.shape) == (None, H, N, N) and s_spec.dtype == "float32"
    model.get_layer("wkv").u.assign(data["u"])
    y, state = model(_feed(data))
    y_ref, s_ref = wkv_reference(*_feed(data)[:4], data["u"], N, data["init_state"])
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT
    assert rel_err(to_numpy(state), s_ref) <= FP32_OUT


def test_without_state_returns_y_only_and_u_gets_gradients(data):
    layer = _layer_with_u(data["u"])
    y = layer(*(data[name] for name in "rkvw"))
    y_ref, _ = wkv_reference(*(data[name] for name in "rkvw"), data["u"], N)
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT
    assert [v.name for v in layer.trainable_weights] == ["u"]
    # one SGD step of Keras' fit on the mean squared y moves u by -lr * du, du the oracle's gradient of that loss
    lr = 0.5
    rkvw = [keras.Input((T, C)) for _ in range(4)]
    model = keras.Model(rkvw, RWKVKernelLayer(N, name="wkv")(*rkvw))
    model.get_layer("wkv").u.assign(data["u"])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.fit([data[name] for name in "rkvw"], np.zeros((B, T, C), np.float32), batch_size=B, epochs=1, verbose=0)
    du = wkv_reference_grads(*(data[name] for name in "rkvw"), data["u"], N, 2 * y_ref / y_ref.size)["u"]
    step = data["u"] - to_numpy(model.get_layer("wkv").u)
    assert rel_err(step, lr * du) <= FP32_GRAD


def test_state_map_selects_start_states(data):
    layer = _layer_with_u(data["u"], with_state=True)
    states = data["init_state"]
    y, state = layer(*(data[name] for name in "rkvw"), init_state=states, state_map=[1, 1])
    y_ref, s_ref = wkv_reference(*(data[name] for name in "rkvw"), data["u"], N, states, [1, 1])
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT
    assert rel_err(to_numpy(state), s_ref) <= FP32_OUT


def test_mixed_bfloat16_keeps_state_and_u_float32(data):
    model = _functional_model(policy="mixed_bfloat16")
    layer = model.get_layer("wkv")
    layer.u.assign(data["u"])
    y_spec, s_spec = model.outputs
    assert y_spec.dtype == "bfloat16" and s_spec.dtype == "float32"
    assert layer.compute_dtype == "bfloat16"

    # k = v = 0 and decay exactly 1 (w = -1e9): the final state must equal init_state bit for bit. 1 + 2^-12
    # is not a bfloat16 number, so a policy cast of init_state (or of the returned state) would show here.
    zeros = np.zeros((B, T, C), np.float32)
    s0 = np.full((B, H, N, N), 1.0 + 2.0 ** -12, np.float32)
    y, state = model([data["r"], zeros, zeros, np.full((B, T, C), -1e9, np.float32), s0])
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(state.dtype) == "float32"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(state), s0)

    # and real inputs: y within bfloat16 tolerance of the oracle fed the bf16-rounded inputs
    y, state = model(_feed(data))
    feed = [bf16_round(data[name]) for name in "rkvw"]
    y_ref, s_ref = wkv_reference(*feed, data["u"], N, data["init_state"])
    assert rel_err(to_numpy(y), y_ref) <= BF16
    assert rel_err(to_numpy(state), s_ref) <= BF16

    # the operator is handed bfloat16 r, k, v, w but the float32 u (the policy does not autocast it)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(zip("rkvwu", (keras.backend.standardize_dtype(x.dtype) for x in args)))
        return operator(*args, **kwargs)

    operator, layer.operator = layer.operator, spy
    model(_feed(data))
    assert seen == {"r": "bfloat16", "k": "bfloat16", "v": "bfloat16", "w": "bfloat16", "u": "float32"}


def test_get_config_from_config_round_trip(data):
    layer = _layer_with_u(data["u"], with_state=True, ops_loop=True, dtype="mixed_bfloat16", name="wkv6")
    config = layer.get_config()
    assert config["head_size"] == N and config["with_state"] and config["ops_loop"]
    clone = RWKVKernelLayer.from_config(config)
    assert (clone.head_size, clone.with_state, clone.ops_loop, clone.name) == (N, True, True, "wkv6")
    assert clone.dtype_policy.name == "mixed_bfloat16"
    clone.build((None, None, C))
    clone.set_weights(layer.get_weights())
    args = [data[name] for name in "rkvw"]
    for a, b in zip(layer(*args, init_state=data["init_state"]), clone(*args, init_state=data["init_state"])):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # serialize/deserialize by registered name, as model.save does
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, RWKVKernelLayer) and restored.get_config() == config


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_model_save_load_model_round_trip(data, tmp_path, policy):
    model = _functional_model(policy)
    model.get_layer("wkv").u.assign(data["u"])
    path = str(tmp_path / "wkv.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("wkv")
    assert isinstance(layer, RWKVKernelLayer) and layer.with_state
    np.testing.assert_array_equal(to_numpy(layer.u), data["u"])
    for a, b in zip(model(_feed(data)), loaded(_feed(data))):
        assert keras.backend.standardize_dtype(a.dtype) == keras.backend.standardize_dtype(b.dtype)
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_channels_must_be_a_multiple_of_head_size():
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKVKernelLayer(N)(keras.Input((T, C + 1)), keras.Input((T, C + 1)), keras.Input((T, C + 1)),
                           keras.Input((T, C + 1)))
