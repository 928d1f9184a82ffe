"""Tolerances of the model tests (relative L2 errors), from the issue: float32 1e-5 against the official
runtime, bfloat16 2e-2 on the logits."""
import keras
import numpy as np

FP32 = 1e-5
BF16_LOGITS = 2e-2


def to_numpy(x):
    x = getattr(x, "value", x)  # a Keras variable: its tensor
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
