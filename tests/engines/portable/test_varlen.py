"""Packed sequences on the portable engine: packed equals the float64 oracle run on each sequence alone (outputs,
final states, every gradient), fp32 and bf16, for random packings (empty and one-token sequences, boundaries inside
and at chunk edges, T not a multiple of the chunk), strong decays and masks, and compiled."""
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator.autodiff import vjp
from rwkv6_keras_operator.engines.portable.chunked import CHUNK
from rwkv6_keras_operator.engines.portable.varlen import varlen_wkv, wkv_varlen
from rwkv6_keras_operator.reference import wkv_reference_varlen, wkv_reference_varlen_grads
from tests.helpers import BACKEND, BF16, FP32_GRAD, FP32_OUT, make_inputs, rel_err, rounded, to_numpy

TOL = {"float32": (FP32_OUT, FP32_GRAD), "bfloat16": (BF16, BF16)}
H, N = 2, 8


# Packings of T = 70 tokens into 6 sequences (one shape: jax compiles once for all of them); CHUNK = 32.
T, n = 70, 6
PACKINGS = [
    [0, 0, 1, 5, 37, 69, 70],              # empty and one-token sequences, cuts inside chunks
    [0, 32, 64, 64, 65, 70, 70],           # cuts at chunk edges, an empty sequence last
    [0, 70, 70, 70, 70, 70, 70],           # one sequence, then empty ones
    [0, 3, 40, 41, 42, 43, 70],            # a sequence across a chunk edge, runs of one-token sequences
]


def random_packing(rng):
    """n + 1 offsets from 0 to T, some cuts exactly at chunk edges."""
    cuts = rng.integers(0, T + 1, n - 1)
    at_edges = rng.random(n - 1) < 0.3
    cuts[at_edges] = cuts[at_edges] // CHUNK * CHUNK
    return np.concatenate([[0], np.sort(cuts), [T]])


def starts_for(form, rng, n, H=H, N=N):
    """(init_state given to the engine per sequence, init_state and state_map as the oracle takes them)."""
    if form == "none":
        return None, None, None
    states = (rng.standard_normal((5, H, N, N)) * 0.3).astype(np.float32)
    if form == "one per sequence":
        return np.resize(states, (n, H, N, N)), np.resize(states, (n, H, N, N)), None
    state_map = rng.integers(0, 5, n)
    return states[state_map], states, state_map


def check_packed(cu, dtype, form, decay="masks", seed=None, fn=varlen_wkv, H=H, N=N):
    rng = np.random.default_rng(seed)
    cu = np.asarray(cu, np.int32)
    T, n = int(cu[-1]), len(cu) - 1
    x = make_inputs(1, T, H, N, seed, decay=decay)
    feed = {name: rounded(x[name], dtype) for name in "rkvw"}
    dy = rounded(rng.standard_normal((1, T, H * N)), dtype)
    dstate = rng.standard_normal((n, H, N, N)).astype(np.float32)
    s0, init_state, state_map = starts_for(form, rng, n, H, N)
    y_ref, s_ref = wkv_reference_varlen(*(feed[a] for a in "rkvw"), x["u"], N, cu, init_state, state_map)
    g_ref = wkv_reference_varlen_grads(*(feed[a] for a in "rkvw"), x["u"], N, cu, dy, dstate, init_state, state_map)
    tensors = [ops.convert_to_tensor(feed[a].reshape(1, T, H, N), dtype) for a in "rkvw"]
    tensors.append(ops.convert_to_tensor(x["u"]))
    if s0 is not None:
        tensors.append(ops.convert_to_tensor(s0))
    cu_tensor = ops.convert_to_tensor(cu)

    def call(r, k, v, w, u, s=None):
        y, states = fn(r, k, v, w, u, s, cu_tensor)
        return ops.reshape(y, (1, T, H * N)), states

    (y, states), grads = vjp(call, tensors, [dy, dstate])
    tol_out, tol_grad = TOL[dtype]
    assert rel_err(y, y_ref) <= tol_out, ("y", rel_err(y, y_ref))
    assert rel_err(states, s_ref) <= tol_out, ("states", rel_err(states, s_ref))
    want = [g_ref[a].reshape(1, T, H, N) for a in "rkvw"] + [g_ref["u"]]
    if s0 is not None:
        # the engine takes one start state per sequence: the oracle's gradient per sequence is d_starts
        g_starts = wkv_reference_varlen_grads(*(feed[a] for a in "rkvw"), x["u"], N, cu, dy, dstate, s0)
        want.append(g_starts["init_state"])
    for name, g, w in zip(["r", "k", "v", "w", "u", "init_state"], grads, want):
        assert rel_err(g, w) <= tol_grad, (name, rel_err(g, w))
    if s0 is not None and state_map is not None:  # summed over the sequences sharing a state: the oracle's sum
        summed = np.zeros_like(init_state, np.float64)
        np.add.at(summed, state_map, grads[5])
        assert rel_err(summed, g_ref["init_state"]) <= tol_grad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_equals_separate_sequences(dtype):
    for cu in PACKINGS:
        check_packed(cu, dtype, "one per sequence")


@pytest.mark.parametrize("cu", [list(range(13)), [0, 0, 1, 1]], ids=["all one-token", "T = 1"])
def test_one_token_sequences(cu):
    check_packed(cu, "float32", "one per sequence")


@pytest.mark.parametrize("form", ["none", "mapped"])
def test_start_state_forms(form):
    check_packed(PACKINGS[0], "float32", form)


@pytest.mark.parametrize("decay", ["normal", "strong", "masks"])
def test_random_packings(decay):
    rng = np.random.default_rng()
    for _ in range(2):
        check_packed(random_packing(rng), "float32", "one per sequence", decay=decay)


def test_extremes_reset_and_keep_exactly():
    """w = -1e9 everywhere (decay 1) keeps each sequence's start state exactly; the next sequence does not see
    the previous one's tokens."""
    T, cu = 40, np.array([0, 13, 40], np.int32)
    x = make_inputs(1, T, H, N, None)
    w = np.full((1, T, H, N), -1e9, np.float32)
    s0 = np.stack([np.full((H, N, N), 2.0), np.full((H, N, N), -1.0)]).astype(np.float32)
    zeros = np.zeros((1, T, H, N), np.float32)
    y, states = wkv_varlen(*(ops.convert_to_tensor(a) for a in (zeros, zeros, zeros, w, x["u"], s0, cu)))
    assert np.array_equal(to_numpy(states), s0)
    assert np.array_equal(to_numpy(y), np.zeros((1, T, H, N)))


def test_compiled_with_traced_offsets():
    """cu_seqlens a traced tensor of static length: jax.jit, tf.function(jit_compile=True), torch.compile."""
    cu_a, cu_b = np.array([0, 7, 7, 40, 45], np.int32), np.array([0, 0, 32, 33, 45], np.int32)
    x = make_inputs(1, 45, H, N, None, decay="masks", n_state=4)
    args = [ops.convert_to_tensor(x[a].reshape(1, 45, H, N)) for a in "rkvw"]
    args += [ops.convert_to_tensor(x["u"]), ops.convert_to_tensor(x["init_state"])]
    if BACKEND == "jax":
        import jax

        compiled = jax.jit(varlen_wkv)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(varlen_wkv, jit_compile=True)
    else:
        import torch

        compiled = torch.compile(varlen_wkv, backend="aot_eager", dynamic=False)
    for cu in (cu_a, cu_b):  # one trace serves both offsets
        y, states = compiled(*args, ops.convert_to_tensor(cu))
        y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, x["init_state"])
        assert rel_err(to_numpy(y).reshape(1, 45, H * N), y_ref) <= FP32_OUT
        assert rel_err(to_numpy(states), s_ref) <= FP32_OUT
