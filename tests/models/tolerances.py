"""Tolerances of the model tests (relative L2 errors), from the issue: float32 1e-5 against the official
runtime, bfloat16 2e-2 on the logits."""
import keras
import numpy as np

from rwkv6_keras_operator.reference import relative_error as rel_err  # noqa: F401  (for the model tests)

FP32 = 1e-5
BF16_LOGITS = 2e-2


def to_numpy(x):
    x = getattr(x, "value", x)  # a Keras variable: its tensor
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64)


