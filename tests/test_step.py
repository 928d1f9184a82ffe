"""RWKVKernelOperator.step on the active backend: one token for rows of a state pool, against the float64 oracle.

On a CPU machine every backend runs the portable engine here; on a GPU machine the same tests run the Triton
engine (torch) and the Pallas engine (jax). The kernels themselves are also checked on CPU under their
interpreters by tests/engines/triton/test_step.py and tests/engines/pallas/test_step.py.
"""
import keras
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator import RWKVKernelOperator
from rwkv6_keras_operator.reference import wkv_reference
from tests.helpers import BACKEND, BF16, FP32_OUT, make_inputs, rel_err, rounded, to_numpy

H, N = 2, 16
C = H * N


def tensor(x, dtype=None):
    return ops.convert_to_tensor(x, dtype)


def case(B, n, seed, decay="masks"):
    """Inputs of one token a row, a pool of n random states and B distinct random slots."""
    x = make_inputs(B, 1, H, N, seed, decay=decay, n_state=n)
    slots = np.random.default_rng(seed).permutation(n)[:B]
    return x, slots


def oracle(x, slots, dtype):
    seen = {name: rounded(x[name], dtype) for name in "rkvw"}
    y, states = wkv_reference(*(seen[name] for name in "rkvw"), x["u"], N, x["init_state"], slots)
    return y, states


def run_step(op, x, slots, dtype="float32", rank=2, slots_as="list", u_flat=False):
    B = x["r"].shape[0]
    inputs = [tensor(x[name] if rank == 3 else x[name][:, 0], dtype) for name in "rkvw"]
    u = tensor(x["u"].reshape(C) if u_flat else x["u"])
    pool = tensor(x["init_state"])
    given = {"list": list(map(int, slots)), "numpy": np.asarray(slots, np.int64),
             "tensor": tensor(np.asarray(slots, np.int32))}[slots_as]
    y, out = op.step(*inputs, u, pool, given)
    assert tuple(y.shape) == ((B, C) if rank == 2 else (B, 1, C))
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    if BACKEND == "torch":
        assert out is pool, "torch: the pool is updated in place and returned"
    return to_numpy(y).reshape(B, C), to_numpy(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("decay", ["strong", "masks"])
@pytest.mark.parametrize("rank", [2, 3])
def test_step_matches_oracle_and_leaves_other_rows_alone(dtype, decay, rank):
    B, n = 5, 11
    x, slots = case(B, n, seed=rank * 10 + len(decay), decay=decay)
    y, pool = run_step(RWKVKernelOperator(N), x, slots, dtype, rank)
    y_ref, s_ref = oracle(x, slots, dtype)
    tol = FP32_OUT if dtype == "float32" else BF16
    assert rel_err(y, y_ref[:, 0]) <= tol
    assert rel_err(pool[slots], s_ref) <= tol
    others = np.setdiff1d(np.arange(n), slots)
    assert np.array_equal(pool[others], x["init_state"][others]), "rows outside slots must stay bit for bit"


@pytest.mark.parametrize("slots_as", ["list", "numpy", "tensor"])
def test_slots_forms_and_u_as_channels(slots_as):
    x, slots = case(4, 6, seed=3)
    y, pool = run_step(RWKVKernelOperator(N), x, slots, slots_as=slots_as, u_flat=True)
    y_ref, s_ref = oracle(x, slots, "float32")
    assert rel_err(y, y_ref[:, 0]) <= FP32_OUT and rel_err(pool[slots], s_ref) <= FP32_OUT


def test_steps_equal_one_call_over_the_sequence():
    """Two interleaved sequences stepped token by token in a pool of 5 (slots 3 and 1, then swapped order) end where
    one call over each whole sequence ends."""
    T = 7
    x = make_inputs(2, T, H, N, 8, decay="masks", n_state=5)
    op = RWKVKernelOperator(N)
    pool = tensor(x["init_state"])
    ys = []
    for t in range(T):
        order = [0, 1] if t % 2 == 0 else [1, 0]
        slots = [[3, 1][i] for i in order]
        y, pool = op.step(*(tensor(x[name][order, t]) for name in "rkvw"), tensor(x["u"]), pool, slots)
        ys.append(to_numpy(y)[np.argsort(order)])
    y_ref, s_ref = wkv_reference(*(x[name] for name in "rkvwu"), N, x["init_state"], [3, 1])
    assert rel_err(np.stack(ys, 1), y_ref) <= FP32_OUT
    assert rel_err(to_numpy(pool)[[3, 1]], s_ref) <= FP32_OUT
    assert np.array_equal(to_numpy(pool)[[0, 2, 4]], x["init_state"][[0, 2, 4]])


def test_ops_loop_steps_with_the_portable_engine():
    x, slots = case(3, 4, seed=6)
    y, pool = run_step(RWKVKernelOperator(N, ops_loop=True), x, slots)
    y_ref, s_ref = oracle(x, slots, "float32")
    assert rel_err(y, y_ref[:, 0]) <= FP32_OUT and rel_err(pool[slots], s_ref) <= FP32_OUT


def test_compiled_step():
    """Inside jax.jit (the pool donated), tf.function, or (torch) eagerly: the same values."""
    x, slots = case(3, 5, seed=9)
    op = RWKVKernelOperator(N)
    args = [tensor(x[name][:, 0]) for name in "rkvw"] + [tensor(x["u"])]
    slots_t = tensor(np.asarray(slots, np.int32))
    if BACKEND == "jax":
        import jax

        step = jax.jit(op.step, donate_argnums=5)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        step = tf.function(op.step, jit_compile=True)
    else:
        step = op.step
    y, pool = step(*args, tensor(x["init_state"]), slots_t)
    y_ref, s_ref = oracle(x, slots, "float32")
    assert rel_err(to_numpy(y), y_ref[:, 0]) <= FP32_OUT and rel_err(to_numpy(pool)[slots], s_ref) <= FP32_OUT


# ---------------------------------------------------------------------------------------- bad input
def bad_step(**changes):
    x, _ = case(2, 4, seed=0)
    args = {name: tensor(x[name][:, 0]) for name in "rkvw"}
    args.update(u=tensor(x["u"]), pool=tensor(x["init_state"]), slots=[1, 3])
    args.update(changes)
    return RWKVKernelOperator(N).step(*(args[name] for name in ("r", "k", "v", "w", "u", "pool", "slots")))


BAD = {
    "duplicate slots": (dict(slots=[2, 2]), ValueError, "distinct"),
    "slot out of range": (dict(slots=[0, 4]), ValueError, "[0, 4)"),
    "negative slot": (dict(slots=np.array([-1, 0])), ValueError, "[0, 4)"),
    "float slots": (dict(slots=[0.0, 1.0]), TypeError, "`slots` must hold integers"),
    "slots length": (dict(slots=[0, 1, 2]), ValueError, "`slots` must have shape (2,)"),
    "slots missing": (dict(slots=None), TypeError, "`slots`"),
    "pool float16": (dict(pool=np.zeros((4, H, N, N), np.float16)), TypeError, "`pool` must be a float32"),
    "pool shape": (dict(pool=np.zeros((4, H, N, N + 1), np.float32)), ValueError, "`pool` must have shape"),
    "pool rank": (dict(pool=np.zeros((H, N, N), np.float32)), ValueError, "`pool` must have shape"),
    "two tokens": (dict(r=np.zeros((2, 2, C), np.float32)), ValueError, "`r` must have shape (batch, channels)"),
    "k shape": (dict(k=np.zeros((3, C), np.float32)), ValueError, "`k` must have the shape of `r`"),
    "w dtype": (dict(w=np.zeros((2, C), np.float16)), TypeError, "`w` must have the dtype of `r`"),
    "u shape": (dict(u=np.zeros((H, N + 1), np.float32)), ValueError, "`u`"),
    "u missing": (dict(u=None), TypeError, f"`u` is required: a float tensor of shape ({H}, {N})"),
    "C not a multiple": ({name: np.zeros((2, 30), np.float32) for name in "rkvw"}, ValueError, "head_size"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_a_clear_error(name):
    changes, error, words = BAD[name]
    with pytest.raises(error) as info:
        bad_step(**changes)
    assert words in str(info.value), str(info.value)


def test_slot_tensor_checked_again_after_it_changed():
    """A backend tensor of slots is checked when first seen; a torch tensor changed in place is checked again."""
    with pytest.raises(ValueError, match="distinct"):
        bad_step(slots=tensor(np.array([3, 3], np.int32)))
    if BACKEND == "torch":
        good = tensor(np.array([0, 1], np.int32))
        bad_step(slots=good)
        good[1] = 9
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            bad_step(slots=good)


def test_pool_layout_errors_under_torch():
    if BACKEND != "torch":
        pytest.skip("torch only: the pool is updated in place where it lies")
    slots = tensor(np.array([1, 3], np.int32))
    bad_step(slots=slots)   # a good step first: the strided pool has the signature of a cached one
    strided = tensor(np.zeros((4, H, N, 2 * N), np.float32))[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        bad_step(pool=strided, slots=slots)
