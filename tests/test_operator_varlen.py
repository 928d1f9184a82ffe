"""Packed sequences through the public API: `op(..., cu_seqlens=...)` and RWKVKernelLayer.

Packed equals separate op(...) calls, one per sequence (outputs, final states, every gradient), for random
packings with empty and one-token sequences and every form of start states; compiled with a traced cu_seqlens
(jax.jit, tf.function, torch.compile) against the float64 oracle; every bad argument gets a clear error."""
import keras
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator import RWKVKernelLayer, RWKVKernelOperator
from rwkv6_keras_operator.autodiff import vjp
from rwkv6_keras_operator.reference import wkv_reference_varlen, wkv_reference_varlen_grads
from tests.helpers import BACKEND, FP32_GRAD, FP32_OUT, make_inputs, rel_err, to_numpy

H, N = 2, 8
C = H * N
GRADS = ["r", "k", "v", "w", "u", "init_state"]


def tensor(x, dtype=None):
    return ops.convert_to_tensor(x, dtype)


def random_packing(rng, n):
    """n + 1 offsets: n - 2 sequences of 2 to 40 tokens, one empty and one of one token, in a random order."""
    lengths = np.concatenate([rng.integers(2, 41, n - 2), [0, 1]])
    rng.shuffle(lengths)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


# One random packing per run, shared by the start-state forms: the calls of each sequence length compile once.
PACKING = random_packing(np.random.default_rng(), 6)


# start states: form -> (init_state, state_map) given a pool of 5 states and n sequences
START_FORMS = {
    "none": lambda s, n, rng: (None, None),
    "one per sequence": lambda s, n, rng: (np.resize(s, (n, H, N, N)), None),
    "(H,N,N) shared": lambda s, n, rng: (s[0], None),
    "(1,H,N,N) shared": lambda s, n, rng: (s[:1], None),
    "list map": lambda s, n, rng: (s, [int(i) for i in rng.integers(0, 5, n)]),
    "tensor map": lambda s, n, rng: (s, tensor(rng.integers(0, 5, n).astype(np.int32))),
}


def separate_calls(op, x, cu, init_state, state_map, dy, dstate):
    """Outputs, final states and gradients of the packed call, made of one op(...) call per sequence (an empty
    sequence: its start state, whose gradient is the cotangent of its final state)."""
    n = len(cu) - 1
    pool = None if init_state is None else np.reshape(init_state, (-1, H, N, N))
    if state_map is not None:
        index = to_numpy(tensor(state_map)).astype(int)     # sequence i starts from pool[index[i]]
    else:
        index = np.zeros(n, int) if pool is not None and len(pool) == 1 else np.arange(n)
    y = np.zeros((1, cu[-1], C))
    states = np.zeros((n, H, N, N))
    grads = {name: np.zeros((1, cu[-1], C)) for name in "rkvw"}
    grads["u"] = np.zeros((H, N))
    d_pool = None if pool is None else np.zeros_like(pool, np.float64)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        start = np.zeros((1, H, N, N), np.float32) if pool is None else pool[index[i]][None]
        if a == b:
            states[i] = start[0]
            if d_pool is not None:
                d_pool[index[i]] += dstate[i]
            continue
        args = [tensor(x[name][:, a:b]) for name in "rkvw"] + [tensor(x["u"]), tensor(start)]
        (y_i, s_i), g = vjp(lambda r, k, v, w, u, s: op(r, k, v, w, u, with_state=True, init_state=s), args,
                            [dy[:, a:b], dstate[i:i + 1]])
        y[:, a:b], states[i] = y_i, s_i[0]
        for name, g_i in zip("rkvw", g):
            grads[name][:, a:b] = g_i
        grads["u"] += g[4]
        if d_pool is not None:
            d_pool[index[i]] += g[5][0]
    grads["init_state"] = None if init_state is None else d_pool.reshape(np.shape(init_state))
    return y, states, grads


@pytest.mark.parametrize("form", list(START_FORMS))
def test_packed_equals_separate_calls(form):
    rng = np.random.default_rng()
    cu, n, T = PACKING, len(PACKING) - 1, int(PACKING[-1])
    x = make_inputs(1, T, H, N, None, decay="masks", n_state=5)
    init_state, state_map = START_FORMS[form](x["init_state"], n, rng)
    dy = rng.standard_normal((1, T, C)).astype(np.float32)
    dstate = rng.standard_normal((n, H, N, N)).astype(np.float32)
    op = RWKVKernelOperator(N)
    args = [tensor(x[name]) for name in "rkvwu"] + ([] if init_state is None else [tensor(init_state)])

    def packed(r, k, v, w, u, s=None):
        return op(r, k, v, w, u, with_state=True, init_state=s, state_map=state_map, cu_seqlens=cu)

    (y, states), grads = vjp(packed, args, [dy, dstate])
    assert states.shape == (n, H, N, N)
    y_sep, states_sep, g_sep = separate_calls(op, x, cu, init_state, state_map, dy, dstate)
    assert rel_err(y, y_sep) <= FP32_OUT, (cu, rel_err(y, y_sep))
    assert rel_err(states, states_sep) <= FP32_OUT, (cu, rel_err(states, states_sep))
    for name, g in zip(GRADS, grads):
        assert rel_err(g, g_sep[name]) <= FP32_GRAD, (cu, name, rel_err(g, g_sep[name]))
    # and both against the float64 oracle
    pool = None if init_state is None else np.reshape(init_state, (-1, H, N, N))
    ref_map = None if state_map is None else to_numpy(tensor(state_map)).astype(int)
    y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, pool, ref_map)
    assert rel_err(y, y_ref) <= FP32_OUT and rel_err(states, s_ref) <= FP32_OUT


def test_state_not_returned_without_with_state():
    x = make_inputs(1, 9, H, N, None, n_state=2)
    y, state = RWKVKernelOperator(N)(*(tensor(x[a]) for a in "rkvwu"), init_state=tensor(x["init_state"]),
                                     cu_seqlens=[0, 4, 9])
    assert state is None
    y_ref, _ = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, [0, 4, 9], x["init_state"])
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT


def test_compiled_with_traced_offsets():
    """jax.jit(jax.value_and_grad), tf.function(jit_compile=True) with a tape, torch.compile(backend="aot_eager"):
    cu_seqlens a traced tensor of static length; one compiled program serves two different packings."""
    T, n = 45, 4
    x = make_inputs(1, T, H, N, None, decay="masks", n_state=3)
    state_map = tensor(np.array([2, 0, 2, 1], np.int32))
    rng = np.random.default_rng()
    dy = rng.standard_normal((1, T, C)).astype(np.float32)
    dstate = rng.standard_normal((n, H, N, N)).astype(np.float32)
    op = RWKVKernelOperator(N)
    args = [tensor(x[a]) for a in "rkvwu"] + [tensor(x["init_state"])]

    def loss(r, k, v, w, u, s, cu):
        y, states = op(r, k, v, w, u, with_state=True, init_state=s, state_map=state_map, cu_seqlens=cu)
        return ops.sum(ops.cast(y, "float32") * tensor(dy)) + ops.sum(states * tensor(dstate))

    if BACKEND == "jax":
        import jax

        compiled = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        run = lambda cu: compiled(*args, cu)   # noqa: E731
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def run(cu):
            with tf.GradientTape() as tape:
                tape.watch(args)
                value = loss(*args, cu)
            return tape.gradient(value, args)
    else:
        import torch

        compiled = torch.compile(loss, backend="aot_eager", dynamic=False)

        def run(cu):
            leaves = [a.detach().requires_grad_(True) for a in args]
            compiled(*leaves, cu).backward()
            return [a.grad for a in leaves]

    for cu in (np.array([0, 7, 7, 40, 45], np.int32), np.array([0, 0, 32, 33, 45], np.int32)):
        grads = run(tensor(cu))
        g_ref = wkv_reference_varlen_grads(*(x[a] for a in "rkvwu"), N, cu, dy, dstate, x["init_state"],
                                           [2, 0, 2, 1])
        for name, g in zip(GRADS, grads):
            assert rel_err(to_numpy(g), g_ref[name]) <= FP32_GRAD, (name, cu)


# ---------------------------------------------------------------------------------------- bad input
def bad_call(cu_seqlens, batch=1, T=10, **kw):
    x = make_inputs(batch, T, H, N, 0)
    return RWKVKernelOperator(N)(*(tensor(x[a]) for a in "rkvwu"), cu_seqlens=cu_seqlens, **kw)


STATES = np.zeros((3, H, N, N), np.float32)
BAD = {
    "batch 2": (dict(cu_seqlens=[0, 10], batch=2), "batch size 1"),
    "state_map length": (dict(cu_seqlens=[0, 4, 10], init_state=STATES, state_map=[0, 1, 2]),
                         "`state_map` must have shape (2,) (one index per sequence)"),
    "state_map out of range": (dict(cu_seqlens=[0, 4, 10], init_state=STATES, state_map=[0, 3]), "[0, 3)"),
    "init_state count": (dict(cu_seqlens=[0, 4, 5, 6, 10], init_state=STATES),
                         "`init_state` holds 3 states for 4 sequences"),
    "unsorted": (dict(cu_seqlens=[0, 6, 4, 10]), "non-decreasing"),
    "unsorted tensor": (dict(cu_seqlens=tensor(np.array([0, 6, 4, 10], np.int32))), "non-decreasing"),
    "first not 0": (dict(cu_seqlens=[1, 10]), "start at 0"),
    "last not T": (dict(cu_seqlens=[0, 4, 9]), "end at T = 10"),
    "floats": (dict(cu_seqlens=[0.0, 10.0]), "integers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_error(case):
    kw, words = BAD[case]
    with pytest.raises((ValueError, TypeError)) as info:
        bad_call(**kw)
    assert words in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------- the layer
def test_layer_passes_cu_seqlens():
    T, cu = 30, np.array([0, 11, 11, 12, 30], np.int32)
    x = make_inputs(1, T, H, N, None, decay="strong", n_state=4)
    layer = RWKVKernelLayer(N, with_state=True)
    layer.build((1, T, C))
    layer.u.assign(x["u"])
    y, states = layer(*(tensor(x[a]) for a in "rkvw"), init_state=tensor(x["init_state"]), cu_seqlens=cu)
    y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, x["init_state"])
    assert rel_err(to_numpy(y), y_ref) <= FP32_OUT and rel_err(to_numpy(states), s_ref) <= FP32_OUT

    # a functional model with cu_seqlens as an input: the state's spec is one per sequence
    inputs = [keras.Input(batch_shape=(1, T, C)) for _ in "rkvw"]
    offsets = keras.Input(batch_shape=(len(cu),), dtype="int32")
    y_spec, state_spec = layer(*inputs, cu_seqlens=offsets)
    assert tuple(y_spec.shape) == (1, T, C) and tuple(state_spec.shape) == (len(cu) - 1, H, N, N)
    model = keras.Model([*inputs, offsets], [y_spec, state_spec])
    y_model, s_model = model([*(tensor(x[a]) for a in "rkvw"), tensor(cu)])
    y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu)
    assert rel_err(to_numpy(y_model), y_ref) <= FP32_OUT and rel_err(to_numpy(s_model), s_ref) <= FP32_OUT
