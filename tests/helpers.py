"""Shared test helpers: random inputs, errors against the float64 oracle, tolerances."""
import importlib.util
import pathlib
import sys

import keras
import ml_dtypes
import numpy as np

from rwkv6_keras_operator.autodiff import to_numpy  # noqa: F401  (re-exported for the tests)
from rwkv6_keras_operator.reference import relative_error as rel_err  # noqa: F401  (the one measure, re-exported)

# Relative L2 errors against the float64 oracle fed the inputs as the engine sees them (rounded to 16 bits in
# 16-bit runs): never widened to make a test pass. FP16: outputs and gradients in float16 (11-bit significand:
# rounding alone is 2^-12 relative on each value).
FP32_OUT, FP32_GRAD, BF16, FP16 = 1e-5, 1e-4, 1e-2, 1e-3
# the tolerances of (y, the gradients of r, k, v, w) by the dtype they come back in
OF_DTYPE = {"float32": (FP32_OUT, FP32_GRAD), "bfloat16": (BF16, BF16), "float16": (FP16, FP16)}


def tolerances(dtype, values=None, states=None):
    """{result: tolerance} of a run on `dtype` inputs: "y", "state" and the gradients "r", "k", "v", "w", "u",
    "init_state".

    y and the gradients of r, k, v, w come back in `dtype`: its tolerance, or `values` where an engine's products
    round more than the inputs' dtype. The others are float32 results, held to float32 tolerances whatever the input
    dtype: du is an element-wise float32 sum of products of the (rounded) inputs in every engine; the state and the
    gradient of init_state are float32 sums of products with the state, float32-exact where those products are, else
    held to `states`, the tolerance of their rounded operands (a module that passes it says why)."""
    out, grad = OF_DTYPE[dtype] if values is None else (values, values)
    state_out, state_grad = (FP32_OUT, FP32_GRAD) if states is None else (states, states)
    return {"y": out, "r": grad, "k": grad, "v": grad, "w": grad, "u": FP32_GRAD, "state": state_out,
            "init_state": state_grad}


def over_tolerance(errors, tolerance):
    """The entries of `errors` ({result: relative error}, names as in `tolerances`) over their tolerance."""
    return {name: e for name, e in errors.items() if not e <= tolerance[name]}
BACKEND = keras.backend.backend()
ROOT = pathlib.Path(__file__).resolve().parent.parent   # the repository


def load_script(path):
    """A script of the repository (path relative to its root, e.g. "benchmarks/shard_jax.py") as a module."""
    name = pathlib.Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def make_inputs(B, T, H, N, seed, decay="normal", n_state=None):
    """float32 NumPy inputs. decay: "normal" (w ~ N(-1, 1)), "strong" (w up to +4.5: decays to e^-90),
    "masks" (strong, plus w = -1e9 (decay 1) and w = +100 (decay 0) sprinkled in)."""
    rng = np.random.default_rng(seed)
    C = H * N
    r, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3))
    if decay == "normal":
        w = rng.standard_normal((B, T, C)) - 1.0
    else:
        w = rng.uniform(-3.0, 4.5, (B, T, C))
        if decay == "masks":
            w[rng.random((B, T, C)) < 0.15] = -1e9
            w[rng.random((B, T, C)) < 0.05] = 100.0
    inputs = {"r": r, "k": k, "v": v, "w": w.astype(np.float32),
              "u": (rng.standard_normal((H, N)) * 0.5).astype(np.float32)}
    if n_state is not None:
        inputs["init_state"] = (rng.standard_normal((n_state, H, N, N)) * 0.3).astype(np.float32)
    return inputs


def bf16_round(x):
    """x rounded to bfloat16 and back to float32: what the oracle sees in bf16 tests."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def rounded(x, dtype):
    """x as an engine of input dtype `dtype` sees it (float32 values): inputs, and the cotangent of y, which has
    the dtype of y (w = +100 and -1e9 become +-inf in float16, as the engine sees them)."""
    if dtype == "bfloat16":
        return bf16_round(x)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    return np.asarray(x, np.float32)

