"""cu_seqlens checks (rwkv6_keras_operator/varlen.py): every bad offset list gets a clear error naming the argument."""
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator.varlen import check_cu_seqlens
from tests.helpers import BACKEND, to_numpy

SHAPE = (1, 10, 8)   # (B, T, C)


@pytest.mark.parametrize("form", ["list", "tuple", "numpy int64", "tensor int32"])
def test_good_offsets_in_every_form(form):
    cu = [0, 0, 3, 3, 10]
    given = {"list": cu, "tuple": tuple(cu), "numpy int64": np.array(cu, np.int64),
             "tensor int32": ops.convert_to_tensor(np.array(cu, np.int32))}[form]
    tensor, n = check_cu_seqlens(given, SHAPE)
    assert n == 4 and np.array_equal(to_numpy(tensor), cu)


BAD = {
    "floats": ([0.0, 10.0], SHAPE, TypeError, "integers"),
    "float tensor": (ops.convert_to_tensor(np.array([0.0, 10.0], np.float32)), SHAPE, TypeError, "integers"),
    "rank 2": ([[0, 10]], SHAPE, ValueError, "n + 1 offsets"),
    "one offset": ([0], SHAPE, ValueError, "n + 1 offsets"),
    "batch 2": ([0, 10], (2, 10, 8), ValueError, "batch size 1"),
    "unknown time": ([0, 10], (1, None, 8), ValueError, "sequence length known"),
    "first not 0": ([1, 10], SHAPE, ValueError, "start at 0"),
    "last not T": ([0, 4, 9], SHAPE, ValueError, "end at T = 10"),
    "decreasing": ([0, 6, 4, 10], SHAPE, ValueError, "non-decreasing"),
    "decreasing tensor": (ops.convert_to_tensor(np.array([0, 6, 4, 10], np.int32)), SHAPE, ValueError,
                          "non-decreasing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_offsets_raise_a_clear_error(case):
    cu, shape, error, words = BAD[case]
    with pytest.raises(error) as info:
        check_cu_seqlens(cu, shape)
    assert "`cu_seqlens`" in str(info.value) and words in str(info.value), str(info.value)


def test_traced_offsets_are_not_read():
    """Under jax.jit / tf.function the values are unknown: the check passes them on (shape checks only)."""
    if BACKEND == "torch":
        pytest.skip("torch tensors are read eagerly; torch.compile is covered by the engine tests")
    cu = np.array([0, 6, 4, 10], np.int32)   # wrong values, not visible while tracing
    if BACKEND == "jax":
        import jax

        got = jax.jit(lambda c: check_cu_seqlens(c, SHAPE)[0])(cu)
    else:
        import tensorflow as tf

        got = tf.function(lambda c: check_cu_seqlens(c, SHAPE)[0])(cu)
    assert np.array_equal(to_numpy(got), cu)
