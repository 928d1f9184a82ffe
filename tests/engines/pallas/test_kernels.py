"""The Pallas engine against the float64 oracle: outputs, final states and every gradient.

On a machine without a CUDA GPU the kernels run in the Pallas interpreter (`interpret=True`, chosen by the engine
itself), at tiny shapes; on a CUDA machine the same tests run the compiled kernels. The engine is called directly
with a small chunk (16) so that a few dozen steps already cross several chunks; the operator-level tests select the
engine through the `gpu_engine` fixture (tests/conftest.py).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv6_keras_operator.engines import pallas
from rwkv6_keras_operator.engines.pallas import binding
from rwkv6_keras_operator.engines.pallas.settings import Settings
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BF16, FP32_GRAD, FP32_OUT, make_inputs, over_tolerance, rel_err, rounded, tolerances

pytestmark = pytest.mark.requires("pallas")

CHUNK = 16
COMPILED = jax.default_backend() == "gpu"   # else the kernels run in the Pallas interpreter
RECURRENT_KERNEL = "wkv6_recurrent"          # the pallas_call of the step-by-step kernel


def tolerance(dtype, low_precision="tf32"):
    """tests.helpers.tolerances for `dtype` inputs with 16-bit products in `low_precision` ("tf32", or "bf16"/"f16":
    operands rounded to the input dtype). The interpreter multiplies "tf32" operands in float32 and takes the products
    with a state of "f16" runs in tf32 too (float32 there), so only "bf16", which rounds the state to bfloat16 as an
    operand (and stores the chunk states in bfloat16), makes the state and the gradient of init_state bfloat16-level.
    Compiled, 16-bit runs multiply tf32 or 16-bit operands everywhere: BF16 for all but du (element-wise float32)."""
    if dtype == "float32":
        return tolerances(dtype)
    if COMPILED:
        return tolerances(dtype, values=BF16, states=BF16)
    return tolerances(dtype, states=BF16 if low_precision == "bf16" else None)


def engine(chunk=CHUNK, **settings):
    """The engine's wkv with Settings(chunk=chunk, **settings); 16-bit products in tf32 unless low_precision says."""
    settings = Settings(chunk=chunk, **{"low_precision": "tf32", **settings})
    return lambda r, k, v, w, u, s0: binding.wkv(r, k, v, w, u, s0, settings=settings)


def heads(x, B, T, H, N, dtype):
    return [jnp.asarray(x[n].reshape(B, T, H, N)).astype(dtype) for n in "rkvw"]


def oracle_case(B, T, H, N, decay, dtype, seed, with_s0=True, with_dstate=True):
    """Inputs (rounded to dtype as the engine sees them), cotangents, and the oracle's outputs and gradients.
    with_dstate=False: the loss is on y alone (the state's cotangent is None)."""
    x = make_inputs(B, T, H, N, seed, decay=decay, n_state=B)
    seen = {n: rounded(x[n], dtype) for n in "rkvw"}
    rng = np.random.default_rng(seed + 1000)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32) if with_dstate else None
    s0 = x["init_state"] if with_s0 else None
    want = wkv_reference(*(seen[n] for n in "rkvw"), x["u"], N, s0)
    grads = wkv_reference_grads(*(seen[n] for n in "rkvw"), x["u"], N, dy, ds, s0)
    return x, dy, ds, want, grads


def check(B, T, H, N, decay="masks", dtype="float32", seed=0, with_s0=True, fn=None, transform=None,
          low_precision="tf32", with_dstate=True):
    """The engine's y, final state and gradients against the oracle; with_dstate=False differentiates y alone."""
    x, dy, ds, (y_ref, s_ref), g_ref = oracle_case(B, T, H, N, decay, dtype, seed, with_s0, with_dstate)
    args = heads(x, B, T, H, N, dtype) + [jnp.asarray(x["u"])]
    if with_s0:
        args.append(jnp.asarray(x["init_state"]))
    fn = fn or engine(low_precision=low_precision)
    call = (lambda *a: fn(*a)) if with_s0 else (lambda *a: fn(*a, None))
    f = call if transform is None else transform(call)
    dy = jnp.asarray(dy.reshape(B, T, H, N), dtype)
    if with_dstate:
        (y, s), pullback = jax.vjp(f, *args)
        grads = pullback((dy, jnp.asarray(ds)))
    else:   # the state is an auxiliary output: its cotangent never reaches the engine
        y, pullback, s = jax.vjp(f, *args, has_aux=True)
        grads = pullback(dy)
    assert y.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32
    errors = {"y": rel_err(np.asarray(y, np.float32).reshape(B, T, H * N), y_ref), "state": rel_err(s, s_ref)}
    names = ["r", "k", "v", "w", "u"] + (["init_state"] if with_s0 else [])
    for name, g in zip(names, grads):
        want = g_ref[name]
        errors[name] = rel_err(np.asarray(g, np.float32).reshape(want.shape), want)
    bad = over_tolerance(errors, tolerance(dtype, low_precision))
    assert not bad, f"errors over tolerance: {bad} (all: {errors})"
    return errors


def kernels(fn, *args):
    """The names of the Pallas kernels that fn(*args) runs (its jaxpr's pallas_calls)."""
    return set(re.findall(r"\bname=(wkv6_\w+)", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize("decay", ["normal", "strong", "masks"])
@pytest.mark.parametrize("T", [CHUNK, 45])
def test_fp32_matches_oracle(decay, T):
    """Several chunks, T a multiple of the chunk or not, decays from mild to exactly 0 and exactly 1."""
    check(2, T, 2, 16, decay, seed=T)


@pytest.mark.parametrize("T", [1, 3, 20])
def test_short_sequences(T):
    """T = 1 and 3 take the step-by-step kernel forward (the gradient runs chunked); 20 is one partial chunk
    past a full one."""
    check(3, T, 2, 16, "masks", seed=T)


@pytest.mark.parametrize("N", [32, 64, 128])
def test_head_sizes(N):
    """N = 128 splits keys and values into blocks of 64 inside the kernels."""
    check(1, 24, 2, N, "strong", seed=N)


@pytest.mark.parametrize("keys", [16, 32])
@pytest.mark.parametrize("N", [16, 128])
def test_fused_state_scan(N, keys):
    """The scan that builds each chunk's state terms as it goes (chosen from 128 programs; forced here), with
    several key and value blocks of the state at N = 128, in the key blocks of few (16) and many (32) programs."""
    fused = engine(state_scan_min_programs=0, state_scan_keys_few=keys)
    check(2, 70, 2, N, "masks", seed=13, fn=fused)
    check(1, 40, 1, N, "strong", seed=14, with_s0=False, fn=fused)


def test_without_start_state():
    check(2, 40, 1, 16, "normal", with_s0=False, seed=5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("low_precision", ["tf32", "input"])
def test_16bit_inputs(dtype, low_precision):
    """16-bit inputs: products in tf32, or with operands rounded to the input dtype (fastest); the float32 results
    held to float32 tolerances where the products are float32-exact (see `tolerance`)."""
    mode = low_precision if low_precision == "tf32" else {"bfloat16": "bf16", "float16": "f16"}[dtype]
    check(2, 40, 2, 32, "masks", dtype, seed=7, low_precision=mode)


def test_strong_decays_keep_dw_exact():
    """dg without the cancelling form: with decays down to e^-90 dw keeps the accuracy of the other gradients."""
    errors = check(2, 64, 2, 32, "strong", seed=11)
    assert errors["w"] < 1e-6, errors


def test_under_jit_and_checkpoint():
    check(2, 37, 2, 16, "masks", seed=3, transform=lambda f: jax.jit(jax.checkpoint(f)))


def test_vmap_over_an_extra_axis():
    """vmap folds the extra axis into the batch: two independent problems sharing an unbatched u. Per problem, its
    values and gradients; and the gradient of the unbatched u through the mapped loss, the sum over the mapped axis
    of each problem's du (the broadcast of u in sharding.py's vmap rule, transposed)."""
    B, T, H, N = 2, 21, 2, 16
    cases = [oracle_case(B, T, H, N, decay, "float32", seed) for decay, seed in (("masks", 1), ("strong", 2))]
    stacked = [jnp.stack([jnp.asarray(c[0][n].reshape(B, T, H, N)) for c in cases]) for n in "rkvw"]
    s0 = jnp.stack([jnp.asarray(c[0]["init_state"]) for c in cases])
    u = jnp.asarray(cases[0][0]["u"])
    fn = engine()

    def loss(r, k, v, w, u, s0, dy, ds):
        y, s = fn(r, k, v, w, u, s0)
        return jnp.sum(y * dy) + jnp.sum(s * ds), (y, s)

    dys = jnp.stack([jnp.asarray(c[1].reshape(B, T, H, N)) for c in cases])
    dss = jnp.stack([jnp.asarray(c[2]) for c in cases])
    axes = (0, 0, 0, 0, None, 0, 0, 0)
    grads, (ys, ss) = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True),
                                       in_axes=axes))(*stacked, u, s0, dys, dss)
    du_mapped = jax.jit(jax.grad(lambda u, *a: jnp.sum(jax.vmap(loss, in_axes=axes)(*a[:4], u, *a[4:])[0])))(
        u, *stacked, s0, dys, dss)
    du_sum = 0
    # the oracle with the shared u (case 0's) for both problems
    for i, c in enumerate(cases):
        x = c[0]
        y_ref, s_ref = wkv_reference(x["r"], x["k"], x["v"], x["w"], cases[0][0]["u"], N, x["init_state"])
        g_ref = wkv_reference_grads(x["r"], x["k"], x["v"], x["w"], cases[0][0]["u"], N, c[1], c[2], x["init_state"])
        assert rel_err(np.asarray(ys[i]).reshape(B, T, H * N), y_ref) <= FP32_OUT
        assert rel_err(ss[i], s_ref) <= FP32_OUT
        for j, name in enumerate("rkvw"):
            assert rel_err(np.asarray(grads[j][i]).reshape(B, T, H * N), g_ref[name]) <= FP32_GRAD, name
        assert rel_err(grads[4][i], g_ref["u"]) <= FP32_GRAD
        assert rel_err(grads[5][i], g_ref["init_state"]) <= FP32_GRAD
        du_sum = du_sum + g_ref["u"]
    assert rel_err(du_mapped, du_sum) <= FP32_GRAD


def test_padding_rows_are_never_written():
    """Rows past T in the last chunk are masked: outputs keep exactly the oracle's values, nothing else changes
    (a sequence of 17 = 16 + 1 puts 15 padding rows in the second chunk)."""
    check(1, CHUNK + 1, 1, 16, "normal", seed=9)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_s0", [True, False], ids=["s0", "no s0"])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_recurrent_kernel_forward(T, with_s0, dtype, rng):
    """A call without differentiation and T <= decode_max_t runs the step-by-step kernel, and only it (a gradient
    would run the chunked forward of the vjp instead): its y and final state against the oracle. Element-wise
    float32, so the state is float32-exact for bfloat16 inputs too."""
    assert T <= pallas.SETTINGS.decode_max_t
    B, H, N = 2, 2, 16
    x = make_inputs(B, T, H, N, rng, decay="masks", n_state=B)
    args = heads(x, B, T, H, N, dtype) + [jnp.asarray(x["u"]), jnp.asarray(x["init_state"]) if with_s0 else None]
    assert kernels(pallas.wkv, *args) == {RECURRENT_KERNEL}
    y, s = pallas.wkv(*args)
    seen = [rounded(x[n], dtype) for n in "rkvw"]
    y_ref, s_ref = wkv_reference(*seen, x["u"], N, x["init_state"] if with_s0 else None)
    assert y.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32
    tol = tolerances(dtype)
    assert rel_err(np.asarray(y, np.float32).reshape(B, T, H * N), y_ref) <= tol["y"]
    assert rel_err(s, s_ref) <= FP32_OUT


def test_longer_or_differentiated_calls_run_chunked():
    """The other side of the switch: T = decode_max_t + 1, and any T under differentiation, run the chunked
    kernels and not the step-by-step one."""
    B, H, N = 1, 1, 16
    u, s0 = jnp.zeros((H, N)), jnp.zeros((B, H, N, N))
    long = [jnp.zeros((B, pallas.SETTINGS.decode_max_t + 1, H, N))] * 4
    assert RECURRENT_KERNEL not in kernels(pallas.wkv, *long, u, s0) and "wkv6_forward" in kernels(pallas.wkv, *long, u, s0)
    short = [jnp.zeros((B, 3, H, N))] * 4
    grad = jax.grad(lambda r, *a: jnp.sum(pallas.wkv(r, *a)[0]))
    assert RECURRENT_KERNEL not in kernels(grad, *short, u, s0)


@pytest.mark.parametrize("with_s0", [True, False], ids=["s0", "no s0"])
def test_loss_on_y_alone(with_s0, seed):
    """The usual training call: a loss on y alone (no cotangent for the final state), over several chunks with a
    partial last one, with and without a start state."""
    check(2, 2 * CHUNK + 5, 2, 16, "masks", seed=seed, with_s0=with_s0, with_dstate=False)


# ------------------------------------------------------------------------------------------ through the operator
@pytest.mark.parametrize("form", ["shared (H,N,N)", "per row", "state_map with repeats"])
def test_operator_state_forms(gpu_engine, chosen_engines, form):
    """init_state in its forms and state_map: values and gradients, the shared rows' gradients summed."""
    from rwkv6_keras_operator import RWKVKernelOperator

    B, T, H, N = 3, 23, 2, 16
    x = make_inputs(B, T, H, N, 4, decay="masks", n_state=4)
    init, state_map, index = {
        "shared (H,N,N)": (x["init_state"][0], None, [0, 0, 0]),
        "per row": (x["init_state"][:B], None, [0, 1, 2]),
        "state_map with repeats": (x["init_state"], [3, 0, 3], [3, 0, 3]),
    }[form]
    states = x["init_state"] if form == "state_map with repeats" else np.asarray(init).reshape(-1, H, N, N)
    rng = np.random.default_rng(4)
    dy = rng.standard_normal((B, T, H * N)).astype(np.float32)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32)
    op = RWKVKernelOperator(N, 4096)

    def f(r, k, v, w, u, init):
        return op(r, k, v, w, u, with_state=True, init_state=init, state_map=state_map)

    args = [jnp.asarray(x[n]) for n in "rkvw"] + [jnp.asarray(x["u"]), jnp.asarray(init)]
    (y, s), pullback = jax.vjp(jax.jit(f), *args)
    grads = pullback((jnp.asarray(dy), jnp.asarray(ds)))
    y_ref, s_ref = wkv_reference(x["r"], x["k"], x["v"], x["w"], x["u"], N, states, index)
    g_ref = wkv_reference_grads(x["r"], x["k"], x["v"], x["w"], x["u"], N, dy, ds, states, index)
    assert set(chosen_engines) == {"pallas"}, chosen_engines
    assert rel_err(y, y_ref) <= FP32_OUT and rel_err(s, s_ref) <= FP32_OUT
    d_init = np.asarray(grads[5]).reshape(-1, H, N, N)
    assert rel_err(d_init, g_ref["init_state"].reshape(-1, H, N, N)[:len(d_init)]) <= FP32_GRAD
    for name, g in zip("rkvwu", grads):
        assert rel_err(g, g_ref[name]) <= FP32_GRAD, name
