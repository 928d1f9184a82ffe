"""Checkpoint files: save_checkpoint round trips through the official runtime; clear errors for other RWKV
versions, missing / unexpected / mis-shaped keys, missing packages, bad tokens and states."""
import sys

import numpy as np
import pytest

from rwkv6_keras_operator.models import CheckpointError, RWKV6, read_checkpoint, write_checkpoint
from rwkv6_keras_operator.models.checkpoint import random_weights

from .conftest import CONFIGS, needs_safetensors
from .tolerances import FP32, rel_err, to_numpy


def test_save_checkpoint_loads_in_the_official_runtime(cases, official, tmp_path):
    """A model's file, with start states set here (as state tuning would), gives the official runtime this
    model's logits; without start states the file has no time_state."""
    case = cases["c64_h16"]
    model = RWKV6.from_checkpoint(case.pth)
    plain = model.save_checkpoint(str(tmp_path / "plain.pth"))
    assert not any(key.endswith("time_state") for key in read_checkpoint(plain))
    rng = np.random.default_rng(1)
    for variable in model.start_states:
        variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
    tuned = model.save_checkpoint(str(tmp_path / "tuned.pth"))
    saved = read_checkpoint(tuned)
    assert saved["blocks.1.att.time_state"].shape == (4, 16, 16)
    np.testing.assert_array_equal(saved["blocks.1.att.time_state"], to_numpy(model.start_states[1]).swapaxes(1, 2))
    results = official([{"checkpoint": tuned, "sequences": [[row.tolist()] for row in case.tokens]}])[0]
    theirs = np.stack([results[b]["logits"][0] for b in range(len(case.tokens))])
    assert rel_err(to_numpy(model(case.tokens)), theirs) < FP32
    reloaded = RWKV6.from_checkpoint(tuned)
    np.testing.assert_array_equal(to_numpy(reloaded(case.tokens)), to_numpy(model(case.tokens)))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip(cases, tmp_path, suffix):
    if suffix == ".safetensors":
        needs_safetensors()
    case = cases["c128_h32_state"]
    model = RWKV6.from_checkpoint(case.pth)
    path = model.save_checkpoint(str(tmp_path / f"copy{suffix}"))
    saved = read_checkpoint(path)
    assert sorted(saved) == sorted(case.weights)
    for key, value in case.weights.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    half_path = model.save_checkpoint(str(tmp_path / f"half{suffix}"), dtype="bfloat16")
    half = read_checkpoint(half_path)
    import ml_dtypes

    for key, value in case.weights.items():
        assert half[key].dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(half[key].astype(np.float32), value.astype(ml_dtypes.bfloat16).astype(np.float32),
                                      err_msg=key)
    again = RWKV6.from_checkpoint(half_path)                  # loads bfloat16 files (as released)
    assert rel_err(to_numpy(again(case.tokens)), to_numpy(model(case.tokens))) < 2e-2


def test_keras_model_file_round_trip(cases, tmp_path):
    import keras

    case = cases["c128_h64_state"]
    model = RWKV6.from_checkpoint(case.pth)
    model.save(str(tmp_path / "model.keras"))
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    assert isinstance(loaded, RWKV6) and loaded.config == model.config
    np.testing.assert_array_equal(to_numpy(loaded(case.tokens)), to_numpy(model(case.tokens)))


def test_path_without_suffix(cases):
    case = cases["c64_h16"]
    assert RWKV6.from_checkpoint(case.pth[:-len(".pth")]).config == case.config


V7_KEYS = ["emb.weight", "blocks.0.att.x_r", "blocks.0.att.w0", "blocks.0.att.r_k", "blocks.0.att.ln_x.weight"]
V5_KEYS = ["emb.weight", "blocks.0.att.time_mix_k", "blocks.0.att.time_decay", "blocks.0.att.ln_x.weight",
           "blocks.0.att.gate.weight"]
V4_KEYS = ["emb.weight", "blocks.0.att.time_mix_k", "blocks.0.att.time_decay", "blocks.0.att.time_first"]


@pytest.mark.parametrize("keys, version", [(V7_KEYS, "RWKV-7"), (V5_KEYS, "RWKV-5"), (V4_KEYS, "RWKV-4")])
def test_other_rwkv_versions(tmp_path, keys, version):
    needs_safetensors()
    path = write_checkpoint(str(tmp_path / "other.safetensors"), {k: np.zeros((4, 4), np.float32) for k in keys})
    with pytest.raises(CheckpointError, match=f"{version} checkpoint"):
        RWKV6.from_checkpoint(path)


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
    needs_safetensors()
    config, _ = CONFIGS["c64_h16"]
    weights = random_weights(config)
    del weights["blocks.1.att.gate.weight"], weights["ln_out.bias"]
    weights["blocks.0.att.extra"] = np.zeros(3, np.float32)
    weights["blocks.0.ffn.value.weight"] = np.zeros((64, 10), np.float32)
    weights["blocks.0.att.time_maa_k"] = weights["blocks.0.att.time_maa_k"].reshape(-1)    # squeezed: accepted
    path = write_checkpoint(str(tmp_path / "bad.safetensors"), weights)
    with pytest.raises(CheckpointError) as error:
        RWKV6.from_checkpoint(path)
    message = str(error.value)
    for text in ("2 missing", "blocks.1.att.gate.weight", "ln_out.bias", "1 unexpected", "blocks.0.att.extra",
                 "1 mis-shaped", "blocks.0.ffn.value.weight: (64, 10), expected (64, 224)"):
        assert text in message
    assert "time_maa_k" not in message


def test_time_state_on_some_layers_only(tmp_path):
    needs_safetensors()
    config, _ = CONFIGS["c64_h16"]
    weights = random_weights(config, time_state=True)
    del weights["blocks.0.att.time_state"]
    with pytest.raises(CheckpointError, match="missing: blocks.0.att.time_state"):
        RWKV6.from_checkpoint(write_checkpoint(str(tmp_path / "half.safetensors"), weights))


def test_converted_and_foreign_files(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "converted.pth")
    torch.save({"emb.weight": torch.zeros(2, 2), "_strategy": "cuda fp16"}, path)
    with pytest.raises(CheckpointError, match="converted by the rwkv package"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=".pth or .safetensors"):
        write_checkpoint(str(tmp_path / "model.bin"), {})
    with pytest.raises(ValueError, match="dtype"):
        write_checkpoint(str(tmp_path / "model.pth"), {}, dtype="float16")


def test_pth_without_torch_is_a_clear_error(cases, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)         # `import torch` raises ImportError
    with pytest.raises(ImportError, match="needs PyTorch"):
        read_checkpoint(cases["c64_h16"].pth)


def test_safetensors_without_the_package_is_a_clear_error(cases, monkeypatch):
    needs_safetensors()
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        read_checkpoint(cases["c64_h16"].safetensors)


def test_bad_tokens_and_states(cases):
    case = cases["c64_h16"]
    model = RWKV6.from_checkpoint(case.pth)
    with pytest.raises(ValueError, match=r"must be in \[0, 1000\)"):
        model(np.array([[1, 1000]]))
    with pytest.raises(ValueError, match=r"must be in \[0, 1000\)"):
        model.call_with_state(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"\(batch, time\)"):
        model.call_with_state(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model.call_with_state(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="list of 2"):
        model.call_with_state(case.chunks[0], model.initial_state(2)[:1])
