"""Shared test helpers: random inputs, errors against the float64 oracle, tolerances."""
import keras
import ml_dtypes
import numpy as np

from rwkv6_keras_operator.autodiff import to_numpy  # noqa: F401  (re-exported for the tests)

# Relative L2 errors against the float64 oracle (DEVELOPERS.md: never widened to make a test pass).
FP32_OUT, FP32_GRAD, BF16 = 1e-5, 1e-4, 1e-2
BACKEND = keras.backend.backend()


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


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
