"""The public operator: the whole contract of DESIGN.md §1, through RWKVKernelOperator."""
import concurrent.futures
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator import RWKVKernelOperator, engines
from rwkv6_keras_operator.autodiff import vjp
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BACKEND, FP32_GRAD, FP32_OUT, make_inputs, rel_err, to_numpy

B, T, H, N = 3, 37, 2, 16
C = H * N


def tensor(x, dtype=None):
    return ops.convert_to_tensor(x, dtype)


def call(op, x, **kw):
    return op(*(tensor(x[n]) for n in "rkvw"), tensor(x["u"]), **kw)


def gpu_or_portable(gpu_engine):
    """The NAME of the engine the operator takes for inputs the GPU engine accepts."""
    return "portable" if gpu_engine is None else gpu_engine.NAME


@pytest.mark.parametrize("u_shape", ["(H, N)", "(C,)"])
def test_u_in_both_shapes(u_shape, rng):
    x = make_inputs(B, T, H, N, rng, decay="strong")
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
def test_state_forms_values_and_gradients(form, rng):
    """y, the final state and every gradient (init_state summed over rows sharing an index) vs the oracle."""
    x = make_inputs(B, T, H, N, rng, decay="masks", n_state=5)
    init_state, state_map, ref_state, ref_map = STATE_FORMS[form](x["init_state"])
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


def test_init_state_used_without_with_state(rng):
    """State tuning: init_state with with_state=False changes y (and is not ignored)."""
    x = make_inputs(B, T, H, N, rng, n_state=1)
    op = RWKVKernelOperator(N, T)
    y, state = call(op, x, init_state=tensor(x["init_state"]))
    assert state is None
    y_ref, _ = wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT
    assert 1e-3 < rel_err(to_numpy(y), wkv_reference(*(x[n] for n in "rkvwu"), N)[0]) < np.inf


@pytest.mark.parametrize("ops_loop", [False, True])
def test_stepping_one_token_at_a_time_equals_the_full_sequence(ops_loop, gpu_engine, chosen_engines, rng):
    """With the backend's GPU engine selectable (conftest.gpu_engine), the full sequence runs on it, and the steps
    (T = 1) on the portable engine with ops_loop=True, on the GPU engine without: both agree with the full call."""
    x = make_inputs(2, 12, H, N, rng, decay="masks", n_state=2)
    op = RWKVKernelOperator(N, 12, ops_loop=ops_loop)
    y_full, s_full = call(op, x, with_state=True, init_state=tensor(x["init_state"]))
    state, ys = tensor(x["init_state"]), []
    for t in range(12):
        y_t, state = op(*(tensor(x[n][:, t:t + 1]) for n in "rkvw"), tensor(x["u"]), with_state=True,
                        init_state=state)
        ys.append(to_numpy(y_t))
    assert rel_err(np.concatenate(ys, axis=1), to_numpy(y_full)) <= FP32_OUT
    assert rel_err(to_numpy(state), to_numpy(s_full)) <= FP32_OUT
    step = "portable" if ops_loop else gpu_or_portable(gpu_engine)
    assert chosen_engines == [gpu_or_portable(gpu_engine)] + [step] * 12


def test_prefill_then_continue_equals_the_full_sequence(rng):
    x = make_inputs(2, 50, H, N, rng, decay="strong")
    op = RWKVKernelOperator(N, 50)
    y_full, s_full = call(op, x, with_state=True)
    first = {n: x[n][:, :33] for n in "rkvw"}
    rest = {n: x[n][:, 33:] for n in "rkvw"}
    y1, s1 = call(op, {**x, **first}, with_state=True)
    y2, s2 = call(op, {**x, **rest}, with_state=True, init_state=s1)
    assert rel_err(np.concatenate([to_numpy(y1), to_numpy(y2)], 1), to_numpy(y_full)) <= FP32_OUT
    assert rel_err(to_numpy(s2), to_numpy(s_full)) <= FP32_OUT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_output_dtype_follows_r_and_state_is_float32(dtype, rng):
    x = make_inputs(2, 9, H, N, rng, n_state=1)
    y, state = RWKVKernelOperator(N, 9)(*(tensor(x[n], dtype) for n in "rkvw"), tensor(x["u"], dtype),
                                         with_state=True, init_state=tensor(x["init_state"], dtype))
    assert keras.backend.standardize_dtype(y.dtype) == dtype and tuple(y.shape) == (2, 9, C)
    assert keras.backend.standardize_dtype(state.dtype) == "float32" and tuple(state.shape) == (2, H, N, N)


def test_operators_of_different_head_sizes_coexist(gpu_engine, chosen_engines, rng):
    """Operators of head sizes 32, 16 and 64 in one process, on the backend's GPU engine where one is selectable
    (each head size its own kernels), each against the oracle."""
    x = make_inputs(2, 20, 2, 32, rng, decay="strong")
    for head_size in (32, 16, 64):
        y, _ = call(RWKVKernelOperator(head_size, 20), {**x, "u": x["u"].reshape(-1)})
        want = wkv_reference(*(x[n] for n in "rkvw"), x["u"].reshape(-1), head_size)[0]
        assert rel_err(to_numpy(y), want) <= FP32_OUT, head_size
    assert chosen_engines == [gpu_or_portable(gpu_engine)] * 3


def test_calls_from_several_threads(rng):
    op = RWKVKernelOperator(N, 64)
    cases = [make_inputs(2, 10 + 7 * i, H, N, rng, decay="masks", n_state=2) for i in range(6)]

    def run(x):
        y, s = call(op, x, with_state=True, init_state=tensor(x["init_state"]))
        return to_numpy(y), to_numpy(s)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, cases))
    for x, (y, s) in zip(cases, results):
        y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])
        assert rel_err(y, y_ref) <= FP32_OUT and rel_err(s, s_ref) <= FP32_OUT


def test_compiled_forward_and_gradients(rng):
    """jax.jit(jax.grad), tf.function(jit_compile=True) with a tape, torch.compile(fullgraph=True) (AOTAutograd
    traces the backward too; the "aot_eager" backend needs no C++ compiler): all give the oracle's gradients."""
    x = make_inputs(2, 45, H, N, rng, decay="masks", n_state=2)
    dy = rng.standard_normal((2, 45, C)).astype(np.float32)
    op = RWKVKernelOperator(N, 45)
    args = [tensor(x[n]) for n in "rkvwu"] + [tensor(x["init_state"])]
    dy_tensor = tensor(dy)

    def loss(r, k, v, w, u, s):
        y, state = op(r, k, v, w, u, with_state=True, init_state=s)
        return ops.sum(y * dy_tensor) + ops.sum(state)

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
        import torch

        torch._dynamo.reset()
        args = [a.requires_grad_(True) for a in args]
        torch.compile(loss, backend="aot_eager", fullgraph=True)(*args).backward()
        grads = [a.grad for a in args]
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, np.ones((2, H, N, N)), x["init_state"])
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        assert rel_err(to_numpy(g), g_ref[name]) <= FP32_GRAD, name


@pytest.mark.requires("tensorflow")
def test_tf_function_with_unknown_batch_and_time(rng):
    """Graph tracing with None batch and time dimensions."""
    import tensorflow as tf

    x = make_inputs(2, 11, H, N, rng, n_state=1)
    op = RWKVKernelOperator(N, 11)
    spec = tf.TensorSpec((None, None, C), tf.float32)  # batch and time unknown while tracing
    f = tf.function(lambda r, k, v, w: op(r, k, v, w, tensor(x["u"]), init_state=tensor(x["init_state"]))[0],
                    input_signature=[spec] * 4)
    y = f(*(x[n] for n in "rkvw"))
    assert rel_err(to_numpy(y), wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])[0]) <= FP32_OUT


# head sizes each GPU engine takes (README, "Engines")
HEAD_SIZES = {"triton": (16, 32, 64, 128), "pallas": (16, 32, 64, 128, 256)}


def test_engine_selection(gpu_engine, monkeypatch):
    """engines.select on inputs the backend's GPU engine takes (made selectable here by conftest.gpu_engine): the
    GPU engine for every input dtype and head size it takes, with ops_loop for T > 1 and without it for T == 1;
    the portable engine for ops_loop with T == 1, for a head size or dtype it does not take (a head size warns
    once), and for everything under OPS_KERNEL. Under tensorflow (no GPU engine) portable throughout."""
    gpu = gpu_or_portable(gpu_engine)

    def chosen(T=5, head_size=16, dtype="float32", ops_loop=False):
        return engines.select(ops.zeros((2, T, 2, head_size), dtype), head_size, ops_loop).NAME

    for dtype in ("float32", "bfloat16", "float16"):
        assert chosen(dtype=dtype) == gpu, dtype
    for head_size in (16, 32, 64, 128, 256):
        want = gpu if gpu == "portable" or head_size in HEAD_SIZES[gpu] else "portable"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert chosen(head_size=head_size) == want, head_size
    assert chosen(T=1) == gpu
    assert chosen(T=5, ops_loop=True) == gpu
    assert chosen(T=1, ops_loop=True) == "portable"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert engines.select(np.zeros((2, 5, 2, 16), np.float64), 16, False).NAME == "portable"   # (NumPy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chosen(head_size=40) == chosen(head_size=40) == "portable"
    assert len([w for w in caught if "40" in str(w.message)]) == (gpu != "portable"), [str(w.message) for w in caught]
    monkeypatch.setattr(engines, "FORCE_PORTABLE", True)   # OPS_KERNEL=1 (read at import: see the next test)
    for dtype in ("float32", "bfloat16"):
        assert chosen(dtype=dtype) == chosen(T=1, dtype=dtype) == "portable"


@pytest.mark.parametrize("with_init", [True, False], ids=["init_state", "no init_state"])
def test_loss_on_y_alone(with_init, gpu_engine, chosen_engines, rng):
    """The usual training call, with_state=False and a loss on y alone, on the backend's GPU engine where one is
    selectable: every gradient against the oracle's with no state term, over three chunks (the last partial) of
    either GPU engine (32 steps), with and without init_state."""
    B_, T_ = 2, 70
    x = make_inputs(B_, T_, H, N, rng, decay="masks", n_state=B_)
    dy = rng.standard_normal((B_, T_, C)).astype(np.float32)
    op = RWKVKernelOperator(N, T_)
    init = x["init_state"] if with_init else None
    args = [tensor(x[n]) for n in "rkvwu"] + ([tensor(init)] if with_init else [])

    def fn(r, k, v, w, u, s=None):
        y, state = op(r, k, v, w, u, init_state=s)
        assert state is None
        return (y,)

    (y,), grads = vjp(fn, args, [dy])
    assert chosen_engines == [gpu_or_portable(gpu_engine)]
    y_ref, _ = wkv_reference(*(x[n] for n in "rkvwu"), N, init)
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, None, init)
    assert rel_err(y, y_ref) <= FP32_OUT
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        assert rel_err(g, g_ref[name]) <= FP32_GRAD, name


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_ops_kernel_env_forces_the_portable_engine():
    """OPS_KERNEL is read at import (what it then does to the selection: test_engine_selection)."""
    code = "import rwkv6_keras_operator.engines as e; print(e.FORCE_PORTABLE)"
    for value, forced in (("1", "True"), ("0", "False")):
        out = _run_python(code, OPS_KERNEL=value)
        assert out.stdout.split() == [forced], (value, out.stderr[-2000:])


@pytest.mark.requires("torch")
def test_pytorch_spelling_of_the_backend():
    """KERAS_BACKEND=pytorch works as torch (in the torch pass of the suite: it needs torch installed)."""
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
    "T = 0": ({n: np.zeros((2, 0, C), np.float32) for n in "rkvw"}, ValueError, "at least one time step"),
    **{f"{n} missing": ({n: None}, TypeError, f"`{n}` is required") for n in "rkvw"},
    "float64 inputs": ({n: np.zeros((2, 5, C), np.float64) for n in "rkvw"}, TypeError, "got dtype float64"),
    "u integer": (dict(u=np.zeros((H, N), np.int32)), TypeError, "`u`"),
    "state_map float tensor": (dict(init_state=np.zeros((3, H, N, N), np.float32),
                                    state_map=tensor(np.array([0.0, 1.0], np.float32))), TypeError, "integers"),
    "state_map 2-D": (dict(init_state=np.zeros((3, H, N, N), np.float32), state_map=np.zeros((2, 1), np.int32)),
                      ValueError, "`state_map` must have shape (2,)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_error(case):
    changes, error, words = BAD[case]
    with pytest.raises(error, match=None) as info:
        bad_call(**changes)
    assert words in str(info.value), str(info.value)


def test_errors_stay_after_cached_calls():
    """The checks' outcome is cached per signature (shapes, dtypes, devices): a decode step of good backend tensors
    twice, then bad ones of a signature next to it raise every time (no error is cached away)."""
    x = make_inputs(2, 1, H, N, 0, n_state=2)
    args = [tensor(x[n]) for n in "rkvwu"]
    op = RWKVKernelOperator(N)
    for _ in range(2):
        op(*args, with_state=True, init_state=tensor(x["init_state"]))
    bad = {"u": (dict(u=tensor(np.zeros((H, N + 1), np.float32))), ValueError, "`u`"),
           "init_state": (dict(init_state=tensor(np.zeros((2, H, N, N), np.int32))), TypeError, "`init_state`"),
           "k": (dict(k=tensor(np.zeros((2, 1, C), np.float16))), TypeError, "`k`")}
    for changes, error, words in bad.values():
        call = dict(zip("rkvwu", args), init_state=tensor(x["init_state"]))
        call.update(changes)
        for _ in range(2):
            with pytest.raises(error, match=words):
                op(*(call[n] for n in "rkvwu"), with_state=True, init_state=call["init_state"])


def test_state_map_tensor_out_of_range_is_caught_eagerly():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bad_call(init_state=np.zeros((3, H, N, N), np.float32), state_map=tensor(np.array([0, 7], np.int32)))


@pytest.mark.parametrize("head_size", [0, -4, 2.5, "64", True])
def test_bad_head_size(head_size):
    with pytest.raises(ValueError, match="head_size"):
        RWKVKernelOperator(head_size, 16)
