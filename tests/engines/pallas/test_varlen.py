"""Packed sequences (cu_seqlens) on the Pallas engine: binding.wkv_varlen against the float64 oracle run on each
sequence alone and against the engine's own calls one sequence at a time (outputs, final states, every gradient),
fp32 and bf16, for packings with empty and one-token sequences, boundaries inside and at chunk edges and T not a
multiple of the chunk, strong decays and masks, both state scans; jitted with traced offsets, under vmap, and
through the operator.

Without a CUDA GPU the kernels run in the Pallas interpreter: tiny shapes, chunks of 16 so that 70 tokens already
cross several chunks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv6_keras_operator import RWKVKernelOperator
from rwkv6_keras_operator.engines.pallas import binding
from rwkv6_keras_operator.engines.pallas.settings import Settings
from rwkv6_keras_operator.reference import wkv_reference_varlen, wkv_reference_varlen_grads
from tests.engines.portable.test_varlen import PACKINGS, check_packed, random_packing
from tests.helpers import FP32_GRAD, FP32_OUT, make_inputs, rel_err

pytestmark = pytest.mark.requires("pallas")

H, N = 2, 16
CHUNK = 16   # the portable tests' packings cut at multiples of 32: chunk edges here too
# the state scans: state_scan_min_programs = 1 takes the fused kernel (state_scan_kernel) at these shapes, the
# default the two kernels state_terms and scan_terms
SCANS = {"terms then scan": Settings(chunk=CHUNK), "fused": Settings(chunk=CHUNK, state_scan_min_programs=1)}


def engine(settings=SCANS["terms then scan"]):
    return lambda r, k, v, w, u, s0, cu: binding.wkv_varlen(r, k, v, w, u, s0, cu, settings=settings)


def check(cu, dtype="float32", form="one per sequence", decay="masks", settings=SCANS["terms then scan"], seed=None):
    check_packed(cu, dtype, form, decay=decay, seed=seed, fn=engine(settings), H=H, N=N)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scan", list(SCANS))
def test_packed_equals_oracle(scan, dtype):
    for cu in PACKINGS:
        check(cu, dtype, settings=SCANS[scan])


@pytest.mark.parametrize("cu", [list(range(13)), [0, 0, 1, 1]], ids=["all one-token", "T = 1"])
def test_one_token_sequences(cu):
    check(cu)


@pytest.mark.parametrize("form", ["none", "mapped"])
def test_start_state_forms(form):
    check(PACKINGS[0], form=form)


@pytest.mark.parametrize("decay", ["normal", "strong", "masks"])
def test_random_packings(decay, rng):
    check(random_packing(rng), decay=decay, seed=int(rng.integers(2**31)))


def test_equals_separate_calls_of_the_engine(rng):
    """The packed call and binding.wkv on each sequence alone (same chunk length: the same chunks), outputs, final
    states and every gradient; an empty sequence returns its start state and passes dstate to it."""
    cu = np.array([0, 20, 20, 21, 37], np.int32)
    T, n = int(cu[-1]), len(cu) - 1
    x = make_inputs(1, T, H, N, None, decay="masks")
    args = [jnp.asarray(x[a].reshape(1, T, H, N)) for a in "rkvw"] + [jnp.asarray(x["u"])]
    s0 = jnp.asarray(rng.standard_normal((n, H, N, N)) * 0.3, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((1, T, H, N)), jnp.float32)
    dfinals = jnp.asarray(rng.standard_normal((n, H, N, N)), jnp.float32)
    settings = SCANS["terms then scan"]

    (y, finals), pullback = jax.vjp(lambda *a: binding.wkv_varlen(*a, jnp.asarray(cu), settings=settings), *args, s0)
    grads = pullback((dy, dfinals))
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if a == b:
            assert np.array_equal(finals[i], s0[i]) and np.array_equal(grads[5][i], dfinals[i])
            continue
        pieces = [x[:, a:b] for x in args[:4]] + [args[4], s0[i:i + 1]]
        (y_i, s_i), pullback_i = jax.vjp(lambda *p: binding.wkv(*p, settings=settings), *pieces)
        g_i = pullback_i((dy[:, a:b], dfinals[i:i + 1]))
        assert rel_err(y[:, a:b], y_i) <= FP32_OUT and rel_err(finals[i], s_i[0]) <= FP32_OUT, i
        for name, g, want in zip("rkvw", grads, g_i):
            assert rel_err(g[:, a:b], want) <= FP32_GRAD, (i, name)
        assert rel_err(grads[5][i], g_i[5][0]) <= FP32_GRAD, (i, "s0")


def test_extremes_reset_and_keep_exactly():
    """w = -1e9 (decay 1) and k = v = 0 keep each sequence's start state exactly: the next sequence sees nothing of
    the previous one."""
    T, cu = 40, np.array([0, 13, 13, 40], np.int32)
    x = make_inputs(1, T, H, N, None)
    w = jnp.full((1, T, H, N), -1e9, jnp.float32)
    zeros = jnp.zeros((1, T, H, N), jnp.float32)
    s0 = jnp.stack([jnp.full((H, N, N), 2.0), jnp.full((H, N, N), 3.0), jnp.full((H, N, N), -1.0)])
    y, finals = engine()(zeros, zeros, zeros, w, jnp.asarray(x["u"]), s0, jnp.asarray(cu))
    assert np.array_equal(finals, s0) and np.array_equal(y, np.zeros((1, T, H, N)))


def test_jitted_with_traced_offsets():
    """jax.jit(jax.value_and_grad) with cu_seqlens an argument: one trace serves two packings, each equal to the
    oracle (outputs, states, gradients)."""
    T, n = 45, 4
    x = make_inputs(1, T, H, N, None, decay="masks", n_state=n)
    args = [jnp.asarray(x[a].reshape(1, T, H, N)) for a in "rkvw"] + [jnp.asarray(x["u"]), jnp.asarray(x["init_state"])]
    rng = np.random.default_rng()
    dy = rng.standard_normal((1, T, H * N)).astype(np.float32)
    dstate = rng.standard_normal((n, H, N, N)).astype(np.float32)
    traces = []

    def loss(r, k, v, w, u, s0, cu):
        traces.append(cu)
        y, finals = engine()(r, k, v, w, u, s0, cu)
        return jnp.sum(y.reshape(1, T, H * N) * dy) + jnp.sum(finals * dstate), (y, finals)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
    for cu in (np.array([0, 7, 7, 40, 45], np.int32), np.array([0, 0, 32, 33, 45], np.int32)):
        (_, (y, finals)), grads = compiled(*args, jnp.asarray(cu))
        y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, x["init_state"])
        g_ref = wkv_reference_varlen_grads(*(x[a] for a in "rkvwu"), N, cu, dy, dstate, x["init_state"])
        assert rel_err(y.reshape(1, T, H * N), y_ref) <= FP32_OUT and rel_err(finals, s_ref) <= FP32_OUT
        for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
            assert rel_err(g.reshape(g_ref[name].shape), g_ref[name]) <= FP32_GRAD, name
    assert len(traces) == 1


def test_vmap_runs_each_element(rng):
    """Under vmap (a batch of packed rows, each with its own offsets) the packed ops run once per element: equal to
    the calls one element at a time, outputs and gradients."""
    T, n = 24, 3
    cus = jnp.asarray([[0, 5, 5, 24], [0, 16, 23, 24]], jnp.int32)
    x = [make_inputs(1, T, H, N, None, decay="masks", n_state=n) for _ in range(2)]
    stacked = [jnp.stack([jnp.asarray(xi[a].reshape(1, T, H, N)) for xi in x]) for a in "rkvw"]
    s0 = jnp.stack([jnp.asarray(xi["init_state"]) for xi in x])
    u = jnp.asarray(x[0]["u"])
    dy = jnp.asarray(rng.standard_normal((2, 1, T, H, N)), jnp.float32)

    def loss(r, k, v, w, s0, cu, dy):
        y, finals = engine()(r, k, v, w, u, s0, cu)
        return jnp.sum(y * dy) + jnp.sum(finals), (y, finals)

    gradient = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    batched = jax.vmap(gradient)(*stacked, s0, cus, dy)
    for i in range(2):
        one = gradient(*(a[i] for a in stacked), s0[i], cus[i], dy[i])
        for got, want in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(one)):
            assert rel_err(got[i], want) <= FP32_OUT


def test_batch_of_more_than_one_row_is_an_error():
    x = jnp.zeros((2, 20, H, N), jnp.float32)
    with pytest.raises(ValueError, match="batch size 1"):
        engine()(x, x, x, x, jnp.zeros((H, N)), None, jnp.asarray([0, 20], jnp.int32))


def test_operator_routes_packed_calls_here(gpu_engine, chosen_engines):
    """op(..., cu_seqlens=...) selects this engine and runs its wkv_varlen (not the portable one)."""
    cu = [0, 3, 3, 29, 30]
    T, n = cu[-1], len(cu) - 1
    x = make_inputs(1, T, H, N, None, decay="masks", n_state=2)
    state_map = [1, 0, 1, 1]
    calls = []
    run = gpu_engine.wkv_varlen

    def recording(*args):
        calls.append(args[-1])
        return run(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_engine, "wkv_varlen", recording)
        y, states = RWKVKernelOperator(N)(*(jnp.asarray(x[a]) for a in "rkvwu"), with_state=True,
                                          init_state=jnp.asarray(x["init_state"]), state_map=state_map, cu_seqlens=cu)
    assert chosen_engines == ["pallas"] and len(calls) == 1
    y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, x["init_state"], state_map)
    assert rel_err(y, y_ref) <= FP32_OUT and rel_err(states, s_ref) <= FP32_OUT
    assert states.shape == (n, H, N, N)
