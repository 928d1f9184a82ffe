"""The portable engine against the float64 oracle: values, final states and gradients, float32, bfloat16 and
float16, on every backend."""
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator.engines import portable
from rwkv6_keras_operator.engines.portable.chunked import CHUNK, chunked_wkv
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from rwkv6_keras_operator.autodiff import vjp
from tests.helpers import BACKEND, BF16, FP32_OUT, make_inputs, over_tolerance, rel_err, rounded, tolerances


def exact_float32_products():
    """The backend multiplies float32 matrices in float32 here: not jax or tensorflow on an NVIDIA GPU, which default
    to TF32 (the engine asks for float32 products for float32 inputs only, see chunked.matmul)."""
    if BACKEND == "jax":
        import jax

        return jax.default_backend() != "gpu"
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return not (tf.config.list_physical_devices("GPU") and tf.config.experimental.tensor_float_32_execution_enabled())
    return True


def tolerance(dtype):
    """Every result in the tolerance of the dtype it comes back in: the engine casts 16-bit inputs to float32 and
    runs all of its arithmetic in float32, so the float32 results (state, du, d init_state) of 16-bit runs are
    float32-exact against the oracle fed the rounded inputs, and y and dr, dk, dv, dw only take their rounding to the
    input dtype. Where float32 products run in TF32 (10-bit operands), 16-bit runs keep BF16 for every result."""
    if dtype == "float32" or exact_float32_products():
        return tolerances(dtype)
    return tolerances(dtype, values=BF16, states=BF16)


def run_engine(fn, x, dtype, with_s0, dy, dstate):
    B, T, C = x["r"].shape
    H, N = x["u"].shape
    tensors = [ops.convert_to_tensor(x[n], dtype) for n in "rkvw"] + [ops.convert_to_tensor(x["u"])]
    if with_s0:
        tensors.append(ops.convert_to_tensor(x["init_state"]))

    def call(r, k, v, w, u, s0=None):
        heads = [ops.reshape(a, (B, T, H, N)) for a in (r, k, v, w)]
        y, s = fn(*heads, u, s0)
        return ops.reshape(y, (B, T, C)), s

    return vjp(call, tensors, [dy, dstate])


def check_against_oracle(fn, B, T, H, N, decay, dtype, with_s0=True, seed=None):
    """seed: an int or a NumPy Generator (the tests' `rng`), which draws the inputs and then the cotangents."""
    x = make_inputs(B, T, H, N, seed, decay=decay, n_state=B)
    feed = {n: rounded(x[n], dtype) for n in "rkvw"}
    rng = np.random.default_rng(seed)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)   # the cotangent of y has y's dtype
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32)
    s0 = x["init_state"] if with_s0 else None
    y_ref, s_ref = wkv_reference(*(feed[n] for n in "rkvw"), x["u"], N, s0)
    g_ref = wkv_reference_grads(*(feed[n] for n in "rkvw"), x["u"], N, dy, dstate, s0)
    (y, s), grads = run_engine(fn, {**x, **feed}, dtype, with_s0, dy, dstate)
    errors = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
    names = ["r", "k", "v", "w", "u"] + (["init_state"] if with_s0 else [])
    errors.update({name: rel_err(g, g_ref[name]) for name, g in zip(names, grads)})
    bad = over_tolerance(errors, tolerance(dtype))
    assert not bad, f"errors over tolerance: {bad} (all: {errors})"


@pytest.mark.parametrize("decay", ["normal", "strong", "masks"])
@pytest.mark.parametrize("T", [1, 7, CHUNK + 13, 300])  # T = 1: the one-step path
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_engine_matches_oracle(decay, T, dtype, rng):
    """float16: w = +100 stays 100 (decay 0) and w = -1e9 becomes -inf (decay 1), as the oracle is fed them."""
    check_against_oracle(portable.wkv, 2, T, 2, 16, decay, dtype, seed=rng)


@pytest.mark.parametrize("T", [1, 2, 5, 64])
def test_chunked_path_alone_matches_oracle(T, rng):
    """chunked_wkv itself at lengths where the chunk shrinks (1, 2, 5) or is exact (64), no s0."""
    check_against_oracle(chunked_wkv, 1, T, 2, 8, "masks", "float32", with_s0=False, seed=rng)


def test_head_size_64_and_128(rng):
    check_against_oracle(portable.wkv, 1, 40, 1, 64, "strong", "float32", seed=rng)
    check_against_oracle(portable.wkv, 1, 20, 1, 128, "masks", "float32", seed=rng)


@pytest.mark.parametrize("chunk", [2, 8, 64])
def test_chunk_length_does_not_change_the_result(chunk, rng):
    check_against_oracle(lambda *a: chunked_wkv(*a, chunk=chunk), 1, 50, 2, 8, "masks", "float32", seed=rng)


def test_extreme_decays_give_exact_reset_and_keep(rng):
    """w = +100 (decay 0) must wipe the state exactly; w = -1e9 (decay 1) must keep it exactly."""
    B, T, H, N = 1, 40, 1, 4
    x = make_inputs(B, T, H, N, rng, n_state=1)
    w = np.full((B, T, N), -1e9, np.float32)
    w[:, 20, 2:] = 100.0  # channels 2, 3 reset at step 20
    y, s = portable.wkv(*(ops.convert_to_tensor(a.reshape(B, T, H, N)) for a in (x["r"], x["k"], x["v"], w)),
                        ops.convert_to_tensor(x["u"]), ops.convert_to_tensor(x["init_state"]))
    y_ref, s_ref = wkv_reference(x["r"], x["k"], x["v"], w, x["u"], N, x["init_state"])
    assert rel_err(ops.convert_to_numpy(s)[0, 0], s_ref[0, 0]) <= FP32_OUT
    assert rel_err(ops.convert_to_numpy(y).reshape(B, T, N), y_ref) <= FP32_OUT
    kv = np.einsum("ti,tj->ij", x["k"][0, 20:, 2:], x["v"][0, 20:])  # step 20 writes after the reset
    np.testing.assert_allclose(ops.convert_to_numpy(s)[0, 0, 2:], kv, rtol=1e-5, atol=1e-6)
