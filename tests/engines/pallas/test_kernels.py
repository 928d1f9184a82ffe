"""The Pallas engine against the float64 oracle: outputs, final states and every gradient.

On a machine without a CUDA GPU the kernels run in the Pallas interpreter (`interpret=True`, chosen by the engine
itself), at tiny shapes; on a CUDA machine the same tests run the compiled kernels. The engine is called directly
with a small chunk (16) so that a few dozen steps already cross several chunks; the operator-level tests force the
engine with RWKV6_PALLAS_INTERPRET's switch (common.FORCE_INTERPRET).
"""
import numpy as np
import pytest

from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BACKEND, BF16, FP32_GRAD, FP32_OUT, make_inputs, rel_err, rounded

if BACKEND != "jax":
    pytest.skip(f"the Pallas engine runs under the jax backend (KERAS_BACKEND={BACKEND})", allow_module_level=True)
jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas.triton", reason="this jax has no Pallas Triton backend")
import jax.numpy as jnp  # noqa: E402

from rwkv6_keras_operator.engines.pallas import binding, common  # noqa: E402
from rwkv6_keras_operator.engines.pallas.settings import Settings  # noqa: E402

CHUNK = 16
TOL = {"float32": (FP32_OUT, FP32_GRAD), "bfloat16": (BF16, BF16), "float16": (BF16, BF16)}



def engine(chunk=CHUNK, **settings):
    """The engine's wkv with Settings(chunk=chunk, **settings); 16-bit products in tf32 unless low_precision says."""
    settings = Settings(chunk=chunk, **{"low_precision": "tf32", **settings})
    return lambda r, k, v, w, u, s0: binding.wkv(r, k, v, w, u, s0, settings=settings)


def heads(x, B, T, H, N, dtype):
    return [jnp.asarray(x[n].reshape(B, T, H, N)).astype(dtype) for n in "rkvw"]


def oracle_case(B, T, H, N, decay, dtype, seed, with_s0=True):
    """Inputs (rounded to dtype as the engine sees them), cotangents, and the oracle's outputs and gradients."""
    x = make_inputs(B, T, H, N, seed, decay=decay, n_state=B)
    seen = {n: rounded(x[n], dtype) for n in "rkvw"}
    rng = np.random.default_rng(seed + 1000)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32)
    s0 = x["init_state"] if with_s0 else None
    want = wkv_reference(*(seen[n] for n in "rkvw"), x["u"], N, s0)
    grads = wkv_reference_grads(*(seen[n] for n in "rkvw"), x["u"], N, dy, ds, s0)
    return x, dy, ds, want, grads


def check(B, T, H, N, decay="masks", dtype="float32", seed=0, with_s0=True, fn=None, transform=None):
    x, dy, ds, (y_ref, s_ref), g_ref = oracle_case(B, T, H, N, decay, dtype, seed, with_s0)
    args = heads(x, B, T, H, N, dtype) + [jnp.asarray(x["u"])]
    if with_s0:
        args.append(jnp.asarray(x["init_state"]))
    fn = fn or engine()
    call = (lambda *a: fn(*a)) if with_s0 else (lambda *a: fn(*a, None))
    f = call if transform is None else transform(call)
    (y, s), pullback = jax.vjp(f, *args)
    grads = pullback((jnp.asarray(dy.reshape(B, T, H, N), y.dtype), jnp.asarray(ds)))
    tol_out, tol_grad = TOL[dtype]
    assert y.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32
    errors = {"y": rel_err(np.asarray(y, np.float32).reshape(B, T, H * N), y_ref), "state": rel_err(s, s_ref)}
    names = ["r", "k", "v", "w", "u"] + (["init_state"] if with_s0 else [])
    for name, g in zip(names, grads):
        want = g_ref[name]
        errors["d" + name] = rel_err(np.asarray(g, np.float32).reshape(want.shape), want)
    bad = {k: e for k, e in errors.items() if e > (tol_out if k in ("y", "state") else tol_grad)}
    assert not bad, f"errors over tolerance: {bad} (all: {errors})"
    return errors


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
    """16-bit inputs: products in tf32, or with operands rounded to the input dtype (fastest)."""
    mode = low_precision if low_precision == "tf32" else {"bfloat16": "bf16", "float16": "f16"}[dtype]
    check(2, 40, 2, 32, "masks", dtype, seed=7, fn=engine(low_precision=mode))


def test_strong_decays_keep_dw_exact():
    """dg without the cancelling form: with decays down to e^-90 dw keeps the accuracy of the other gradients."""
    errors = check(2, 64, 2, 32, "strong", seed=11)
    assert errors["dw"] < 1e-6, errors


def test_under_jit_and_checkpoint():
    check(2, 37, 2, 16, "masks", seed=3, transform=lambda f: jax.jit(jax.checkpoint(f)))


def test_vmap_over_an_extra_axis():
    """vmap folds the extra axis into the batch: two independent problems, one of them with u unbatched."""
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
    grads, (ys, ss) = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 3, 5), has_aux=True),
                                       in_axes=(0, 0, 0, 0, None, 0, 0, 0)))(*stacked, u, s0, dys, dss)
    # the oracle with the shared u (case 0's) for both problems
    for i, c in enumerate(cases):
        x = c[0]
        y_ref, s_ref = wkv_reference(x["r"], x["k"], x["v"], x["w"], cases[0][0]["u"], N, x["init_state"])
        g_ref = wkv_reference_grads(x["r"], x["k"], x["v"], x["w"], cases[0][0]["u"], N, c[1], c[2], x["init_state"])
        assert rel_err(np.asarray(ys[i]).reshape(B, T, H * N), y_ref) <= FP32_OUT
        assert rel_err(ss[i], s_ref) <= FP32_OUT
        assert rel_err(np.asarray(grads[0][i]).reshape(B, T, H * N), g_ref["r"]) <= FP32_GRAD
        assert rel_err(np.asarray(grads[1][i]).reshape(B, T, H * N), g_ref["w"]) <= FP32_GRAD
        assert rel_err(grads[2][i], g_ref["init_state"]) <= FP32_GRAD


def test_padding_rows_are_never_written():
    """Rows past T in the last chunk are masked: outputs keep exactly the oracle's values, nothing else changes
    (a sequence of 17 = 16 + 1 puts 15 padding rows in the second chunk)."""
    check(1, CHUNK + 1, 1, 16, "normal", seed=9)


# ------------------------------------------------------------------------------------------ through the operator
@pytest.fixture
def forced(monkeypatch):
    """The operator's dispatch picks the Pallas engine in the interpreter, on the CPU also where a GPU is (there
    the compiled kernels are tested by test_gpu.py; the interpreter on a GPU would run its float32 products in
    jax's default TF32)."""
    monkeypatch.setattr(common, "FORCE_INTERPRET", True)
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def test_operator_selects_pallas(forced):
    from rwkv6_keras_operator import engines
    from rwkv6_keras_operator.engines import pallas

    r = jnp.zeros((1, 5, 32), jnp.float32)
    assert engines.select(r, 16, ops_loop=False) is pallas
    assert engines.select(r[:, :1], 16, ops_loop=True).NAME == "portable"
    with pytest.warns(UserWarning, match="head sizes"):
        assert not pallas.supports(jnp.zeros((1, 5, 24)), 24)


@pytest.mark.parametrize("form", ["shared (H,N,N)", "per row", "state_map with repeats"])
def test_operator_state_forms(forced, form):
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
    assert rel_err(y, y_ref) <= FP32_OUT and rel_err(s, s_ref) <= FP32_OUT
    d_init = np.asarray(grads[5]).reshape(-1, H, N, N)
    assert rel_err(d_init, g_ref["init_state"].reshape(-1, H, N, N)[:len(d_init)]) <= FP32_GRAD
    for name, g in zip("rkvwu", grads):
        assert rel_err(g, g_ref[name]) <= FP32_GRAD, name
