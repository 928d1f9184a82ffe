"""The public operator: the whole contract of DESIGN.md §1, through RWKVKernelOperator."""
import concurrent.futures
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator import RWKVKernelOperator
from rwkv6_keras_operator.autodiff import vjp
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BACKEND, FP32_GRAD, FP32_OUT, make_inputs, rel_err, to_numpy

B, T, H, N = 3, 37, 2, 16
C = H * N


def tensor(x, dtype=None):
    return ops.convert_to_tensor(x, dtype)


def call(op, x, **kw):
    return op(*(tensor(x[n]) for n in "rkvw"), tensor(x["u"]), **kw)


@pytest.mark.parametrize("u_shape", ["(H, N)", "(C,)"])
def test_u_in_both_shapes(u_shape):
    x = make_inputs(B, T, H, N, None, decay="strong")
    u = x["u"] if u_shape == "(H, N)" else x["u"].reshape(C)
    y, state = RWKVKernelOperator(N, 4096)(*(tensor(x[n]) for n in "rkvw"), tensor(u))
    assert state is None
    assert rel_err(to_numpy(y), wkv_reference(x["r"], x["k"], x["v"], x["w"], u, N)[0]) <= FP32_OUT


# init_state forms: (argument given, state_map given, how the oracle sees it)
STATE_FORMS = {
    "none": lambda s: (None, None, None, None),
    "(H,N,N) shared": lambda s: (s[0], None, s[:1], None),
    "(1,H,N,N) shared": lambda s: (s[:1], None, s[:1], None),
    "(B,H,N,N) per row": lambda s: (s[:B], None, s[:B], None),
    "(5,H,N,N) + list map": lambda s: (s, [4, 0, 4], s, [4, 0, 4]),
    "(5,H,N,N) + numpy map": lambda s: (s, np.array([1, 1, 3], np.int64), s, [1, 1, 3]),
    "(5,H,N,N) + tensor map": lambda s: (s, tensor(np.array([2, 0, 2], np.int32)), s, [2, 0, 2]),
    "(B,H,N,N) + permuting map": lambda s: (s[:B], [2, 1, 0], s[:B], [2, 1, 0]),
}


@pytest.mark.parametrize("form", list(STATE_FORMS))
def test_state_forms_values_and_gradients(form):
    """y, the final state and every gradient (init_state summed over rows sharing an index) vs the oracle."""
    x = make_inputs(B, T, H, N, None, decay="masks", n_state=5)
    init_state, state_map, ref_state, ref_map = STATE_FORMS[form](x["init_state"])
    rng = np.random.default_rng()
    dy = rng.standard_normal((B, T, C)).astype(np.float32)
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32)
    op = RWKVKernelOperator(N, 16)  # shorter than T: max_sequence_length limits nothing
    args = [tensor(x[n]) for n in "rkvw"] + [tensor(x["u"])]
    if init_state is not None:
        args.append(tensor(init_state))

    def fn(r, k, v, w, u, s=None):
        return op(r, k, v, w, u, with_state=True, init_state=s, state_map=state_map)

    (y, state), grads = vjp(fn, args, [dy, dstate])
    y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, ref_state, ref_map)
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, dstate, ref_state, ref_map)
    assert rel_err(y, y_ref) <= FP32_OUT
    assert rel_err(state, s_ref) <= FP32_OUT
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        want = g_ref[name]
        if name == "init_state":
            want = want.reshape(np.shape(init_state))
        assert rel_err(g, want) <= FP32_GRAD, name


def test_init_state_used_without_with_state():
    """State tuning: init_state with with_state=False changes y (and is not ignored)."""
    x = make_inputs(B, T, H, N, None, n_state=1)
    op = RWKVKernelOperator(N, T)
    y, state = call(op, x, init_state=tensor(x["init_state"]))
    assert state is None
    y_ref, _ = wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT
    assert rel_err(to_numpy(y), wkv_reference(*(x[n] for n in "rkvwu"), N)[0]) > 1e-3


@pytest.mark.parametrize("ops_loop", [False, True])
def test_stepping_one_token_at_a_time_equals_the_full_sequence(ops_loop):
    x = make_inputs(2, 12, H, N, None, decay="masks", n_state=2)
    op = RWKVKernelOperator(N, 12, ops_loop=ops_loop)
    y_full, s_full = call(op, x, with_state=True, init_state=tensor(x["init_state"]))
    state, ys = tensor(x["init_state"]), []
    for t in range(12):
        y_t, state = op(*(tensor(x[n][:, t:t + 1]) for n in "rkvw"), tensor(x["u"]), with_state=True,
                        init_state=state)
        ys.append(to_numpy(y_t))
    assert rel_err(np.concatenate(ys, axis=1), to_numpy(y_full)) <= FP32_OUT
    assert rel_err(to_numpy(state), to_numpy(s_full)) <= FP32_OUT


def test_prefill_then_continue_equals_the_full_sequence():
    x = make_inputs(2, 50, H, N, None, decay="strong")
    op = RWKVKernelOperator(N, 50)
    y_full, s_full = call(op, x, with_state=True)
    first = {n: x[n][:, :33] for n in "rkvw"}
    rest = {n: x[n][:, 33:] for n in "rkvw"}
    y1, s1 = call(op, {**x, **first}, with_state=True)
    y2, s2 = call(op, {**x, **rest}, with_state=True, init_state=s1)
    assert rel_err(np.concatenate([to_numpy(y1), to_numpy(y2)], 1), to_numpy(y_full)) <= FP32_OUT
    assert rel_err(to_numpy(s2), to_numpy(s_full)) <= FP32_OUT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_output_dtype_follows_r_and_state_is_float32(dtype):
    x = make_inputs(2, 9, H, N, None, n_state=1)
    y, state = RWKVKernelOperator(N, 9)(*(tensor(x[n], dtype) for n in "rkvw"), tensor(x["u"], dtype),
                                         with_state=True, init_state=tensor(x["init_state"], dtype))
    assert keras.backend.standardize_dtype(y.dtype) == dtype and tuple(y.shape) == (2, 9, C)
    assert keras.backend.standardize_dtype(state.dtype) == "float32" and tuple(state.shape) == (2, H, N, N)


def test_two_operators_of_different_head_sizes_coexist():
    x = make_inputs(2, 20, 2, 32, None, decay="strong")
    for head_size in (32, 16, 64):
        y, _ = call(RWKVKernelOperator(head_size, 20), {**x, "u": x["u"].reshape(-1)})
        want = wkv_reference(*(x[n] for n in "rkvw"), x["u"].reshape(-1), head_size)[0]
        assert rel_err(to_numpy(y), want) <= FP32_OUT, head_size


def test_calls_from_several_threads():
    op = RWKVKernelOperator(N, 64)
    cases = [make_inputs(2, 10 + 7 * i, H, N, None, decay="masks", n_state=2) for i in range(6)]

    def run(x):
        y, s = call(op, x, with_state=True, init_state=tensor(x["init_state"]))
        return to_numpy(y), to_numpy(s)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, cases))
    for x, (y, s) in zip(cases, results):
        y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])
        assert rel_err(y, y_ref) <= FP32_OUT and rel_err(s, s_ref) <= FP32_OUT


def test_compiled_forward_and_gradients():
    """jax.jit(jax.grad), tf.function(jit_compile=True) with a tape, torch autograd under torch.compile-free
    eager mode: all give the oracle's gradients."""
    x = make_inputs(2, 45, H, N, None, decay="masks", n_state=2)
    rng = np.random.default_rng()
    dy = rng.standard_normal((2, 45, C)).astype(np.float32)
    op = RWKVKernelOperator(N, 45)
    args = [tensor(x[n]) for n in "rkvwu"] + [tensor(x["init_state"])]

    def loss(r, k, v, w, u, s):
        y, state = op(r, k, v, w, u, with_state=True, init_state=s)
        return ops.sum(y * tensor(dy)) + ops.sum(state)

    if BACKEND == "jax":
        import jax

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def grad_fn(*a):
            with tf.GradientTape() as tape:
                tape.watch(a)
                value = loss(*a)
            return tape.gradient(value, a)

        grads = grad_fn(*args)
    else:
        args = [a.requires_grad_(True) for a in args]
        loss(*args).backward()
        grads = [a.grad for a in args]
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, np.ones((2, H, N, N)), x["init_state"])
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        assert rel_err(to_numpy(g), g_ref[name]) <= FP32_GRAD, name


def test_tf_function_with_unknown_batch_and_time():
    if BACKEND != "tensorflow":
        pytest.skip("tensorflow-only: graph tracing with None batch and time dimensions")
    import tensorflow as tf

    x = make_inputs(2, 11, H, N, None, n_state=1)
    op = RWKVKernelOperator(N, 11)
    spec = tf.TensorSpec((None, None, C), tf.float32)  # batch and time unknown while tracing
    f = tf.function(lambda r, k, v, w: op(r, k, v, w, tensor(x["u"]), init_state=tensor(x["init_state"]))[0],
                    input_signature=[spec] * 4)
    y = f(*(x[n] for n in "rkvw"))
    assert rel_err(to_numpy(y), wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])[0]) <= FP32_OUT


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_ops_kernel_env_forces_the_portable_engine():
    code = ("import rwkv6_keras_operator.engines as e, numpy as np; "
            "print(e.FORCE_PORTABLE, e.select(np.zeros((1, 5, 4)), 4, False).NAME)")
    assert _run_python(code, OPS_KERNEL="1").stdout.split() == ["True", "portable"]
    assert _run_python(code, OPS_KERNEL="0").stdout.split()[0] == "False"


def test_pytorch_spelling_of_the_backend():
    if BACKEND != "torch":
        pytest.skip("needs torch installed; runs in the torch pass of the suite")
    out = _run_python("import rwkv6_keras_operator, keras; print(keras.backend.backend())", KERAS_BACKEND="pytorch")
    assert out.stdout.strip() == "torch", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------- bad input
def bad_call(**changes):
    x = make_inputs(2, 5, H, N, 0, n_state=3)
    args = {n: tensor(x[n]) for n in "rkvw"}
    args["u"] = tensor(x["u"])
    kw = {}
    for name, value in changes.items():
        (args if name in args else kw)[name] = value
    return RWKVKernelOperator(N, 5)(*(args[n] for n in "rkvwu"), **kw)


BAD = {
    "C not a multiple of head_size": ({n: np.zeros((2, 5, 30), np.float32) for n in "rkvw"}, ValueError,
                                      "multiple of head_size"),
    "k shape": (dict(k=np.zeros((2, 6, C), np.float32)), ValueError, "`k`"),
    "v dtype": (dict(v=np.zeros((2, 5, C), np.float16)), TypeError, "`v`"),
    "w rank": (dict(w=np.zeros((2, 5 * C), np.float32)), ValueError, "`w`"),
    "r integer": (dict(r=np.zeros((2, 5, C), np.int32)), TypeError, "`r`"),
    "u shape": (dict(u=np.zeros((H, N + 1), np.float32)), ValueError, "`u`"),
    "u missing": (dict(u=None), TypeError, "`u`"),
    "init_state shape": (dict(init_state=np.zeros((2, H, N, N + 1), np.float32)), ValueError, "`init_state`"),
    "init_state integer": (dict(init_state=np.zeros((2, H, N, N), np.int32)), TypeError, "`init_state`"),
    "n_state not 1 or B": (dict(init_state=np.zeros((3, H, N, N), np.float32)), ValueError, "state_map"),
    "state_map length": (dict(init_state=np.zeros((3, H, N, N), np.float32), state_map=[0, 1, 2]),
                         ValueError, "`state_map`"),
    "state_map out of range": (dict(init_state=np.zeros((3, H, N, N), np.float32), state_map=[0, 3]),
                               ValueError, "[0, 3)"),
    "state_map negative": (dict(init_state=np.zeros((3, H, N, N), np.float32), state_map=np.array([-1, 0])),
                           ValueError, "[0, 3)"),
    "state_map floats": (dict(init_state=np.zeros((3, H, N, N), np.float32), state_map=[0.0, 1.0]),
                         TypeError, "integers"),
    "state_map without init_state": (dict(state_map=[0, 0]), ValueError, "init_state"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_error(case):
    changes, error, words = BAD[case]
    with pytest.raises(error, match=None) as info:
        bad_call(**changes)
    assert words in str(info.value), str(info.value)


def test_state_map_tensor_out_of_range_is_caught_eagerly():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bad_call(init_state=np.zeros((3, H, N, N), np.float32), state_map=tensor(np.array([0, 7], np.int32)))


@pytest.mark.parametrize("head_size", [0, -4, 2.5, "64"])
def test_bad_head_size(head_size):
    with pytest.raises(ValueError, match="head_size"):
        RWKVKernelOperator(head_size, 16)
