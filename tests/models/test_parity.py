"""RWKV6 against the official runtime (`rwkv` pip, float32 CPU) on checkpoints with random weights: logits of
one call, of several calls carrying the state, and the states themselves, within 1e-5 (relative L2)."""
import numpy as np
import pytest

from rwkv6_keras_operator.models import RWKV6

from .conftest import CALL_LENGTHS, needs_safetensors
from .tolerances import FP32, BF16_LOGITS, rel_err, to_numpy


@pytest.fixture
def model(case):
    return RWKV6.from_checkpoint(case.pth)


def test_config_from_shapes(case, model):
    assert model.config == case.config
    assert any(np.any(to_numpy(s) != 0) for s in model.start_states) == case.time_state


def test_logits_one_call(case, model):
    whole, _, _ = case.expected
    assert rel_err(to_numpy(model(case.tokens)), whole) < FP32


def test_calls_carrying_the_state(case, model):
    _, calls, states = case.expected
    state = None
    for c, chunk in enumerate(case.chunks):
        logits, state = model.call_with_state(chunk, state)
        assert rel_err(to_numpy(logits), calls[c]) < FP32, f"call {c} (T={CALL_LENGTHS[c]})"
        for i, (ours, theirs) in enumerate(zip(state, states[c])):
            for part, name in enumerate(("time-mix shift", "WKV state", "channel-mix shift")):
                assert rel_err(to_numpy(ours[part]), theirs[part]) < FP32, f"call {c}, layer {i}, {name}"


def test_explicit_initial_state_is_the_default(case, model):
    a, _ = model.call_with_state(case.chunks[1])
    b, _ = model.call_with_state(case.chunks[1], model.initial_state(len(case.chunks[1])))
    assert rel_err(to_numpy(b), to_numpy(a)) < 1e-6


def test_safetensors_loads_the_same_model(case, model):
    needs_safetensors()
    other = RWKV6.from_checkpoint(case.safetensors)
    for (key, (a, _)), (_, (b, _)) in zip(model.checkpoint_variables().items(),
                                          other.checkpoint_variables().items()):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=key)


def test_bfloat16_logits(case):
    """mixed_bfloat16 (bfloat16 products, float32 state and norms) stays within 2e-2 of the float32 official."""
    whole, _, _ = case.expected
    model = RWKV6.from_checkpoint(case.pth, dtype="mixed_bfloat16")
    assert rel_err(to_numpy(model(case.tokens)), whole) < BF16_LOGITS
