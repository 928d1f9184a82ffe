"""Every engine that can run on this machine under the active backend against the engine protocol
(engines.Engine): its attributes, and wkv's shapes, dtypes, values, final state and gradients against the float64
oracle, with and without a start state, for one step and for several chunks.

Which engines run: the portable engine always; the Triton engine under torch on a CUDA device, or on CPU tensors
under TRITON_INTERPRET=1; the Pallas engine under jax (compiled on a CUDA GPU, in the Pallas interpreter elsewhere).
An engine that cannot run here is skipped with the reason, never counted as passing.
"""
import importlib.util
import os

import keras
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator import engines
from rwkv6_keras_operator.autodiff import vjp
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BACKEND, FP32_GRAD, FP32_OUT, make_inputs, rel_err

B, H, N = 2, 2, 16


def engine_here(name):
    """The engine module if it can run here under the active backend, else pytest.skip with the reason."""
    if name == "triton":
        if BACKEND != "torch":
            pytest.skip(f"the Triton engine runs under torch (KERAS_BACKEND={BACKEND})")
        if importlib.util.find_spec("triton") is None:
            pytest.skip("Triton is not installed")
        import torch

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to check the Triton engine on CPU")
    if name == "pallas":
        if BACKEND != "jax":
            pytest.skip(f"the Pallas engine runs under jax (KERAS_BACKEND={BACKEND})")
        pytest.importorskip("jax.experimental.pallas.triton", reason="this jax has no Pallas Triton backend")
    return importlib.import_module(f"rwkv6_keras_operator.engines.{name}")


def device_tensor(x, dtype="float32"):
    """x as a tensor of the active backend, on the device the engine under test computes on here."""
    if BACKEND == "torch":
        import torch

        return torch.tensor(np.asarray(x), device="cuda" if torch.cuda.is_available() else "cpu").to(
            getattr(torch, dtype))
    return ops.convert_to_tensor(x, dtype)


@pytest.mark.parametrize("name", ["portable", "triton", "pallas"])
def test_attributes(name):
    engine = engine_here(name)
    assert isinstance(engine, engines.Engine)
    assert engine.NAME == name and engine.BACKEND in ("any", BACKEND)
    assert isinstance(engine.is_available(), bool)
    r = device_tensor(np.zeros((1, 3, H, N), np.float32))
    assert isinstance(engine.supports(r, N), bool)


@pytest.mark.parametrize("with_s0", [True, False], ids=["s0", "no s0"])
@pytest.mark.parametrize("T", [1, 45], ids=["T=1", "T=45"])
@pytest.mark.parametrize("name", ["portable", "triton", "pallas"])
def test_wkv_matches_the_oracle(name, T, with_s0):
    """Values, final state and the gradients of all six inputs; T = 45: two chunks, the second partial."""
    engine = engine_here(name)
    x = make_inputs(B, T, H, N, seed=T, decay="masks", n_state=B)
    rng = np.random.default_rng(T + 1)
    dy = rng.standard_normal((B, T, H * N)).astype(np.float32)
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32)
    s0 = x["init_state"] if with_s0 else None
    args = [device_tensor(x[n]) for n in "rkvwu"] + ([device_tensor(s0)] if with_s0 else [])

    def call(r, k, v, w, u, s0=None):
        y, state = engine.wkv(*(ops.reshape(a, (B, T, H, N)) for a in (r, k, v, w)), u, s0)
        assert tuple(y.shape) == (B, T, H, N) and tuple(state.shape) == (B, H, N, N)
        assert keras.backend.standardize_dtype(y.dtype) == "float32"
        assert keras.backend.standardize_dtype(state.dtype) == "float32"
        return ops.reshape(y, (B, T, H * N)), state

    (y, state), grads = vjp(call, args, [dy, dstate])
    y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, s0)
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, dstate, s0)
    errors = {"y": rel_err(y, y_ref), "state": rel_err(state, s_ref)}
    names = ["r", "k", "v", "w", "u"] + (["init_state"] if with_s0 else [])
    for n, g in zip(names, grads):   # None: no gradient flowed, where the true one is 0 (w with T = 1 and no s0)
        errors["d" + n] = rel_err(np.zeros_like(g_ref[n]) if g is None else g.reshape(g_ref[n].shape), g_ref[n])
    bad = {n: e for n, e in errors.items() if e > (FP32_OUT if n in ("y", "state") else FP32_GRAD)}
    assert not bad, f"{name}: errors over tolerance: {bad} (all: {errors})"
    if grads[3] is not None:   # w = +100: a decay of exactly 0, and dw exactly 0 in every engine
        assert np.all(grads[3].reshape(x["w"].shape)[x["w"] >= 100] == 0.0)


@pytest.mark.parametrize("name", ["portable", "triton", "pallas"])
def test_wkv_keeps_the_input_dtype(name):
    """y in r's dtype (bfloat16 here), the state float32."""
    engine = engine_here(name)
    T = 5
    x = make_inputs(B, T, H, N, seed=3)
    heads = [device_tensor(x[n].reshape(B, T, H, N), "bfloat16") for n in "rkvw"]
    y, state = engine.wkv(*heads, device_tensor(x["u"]), None)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(state.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(y, "float32"))))
