"""The Pallas engine compiled on a CUDA GPU, through RWKVKernelOperator: float32 / bfloat16 / float16, decays
from mild to masks, head sizes 32 / 64 / 128, a start state with state_map, decode (the step-by-step kernel forward
only, and under differentiation), and the jax transformations, all against the float64 oracle.

Skipped (with the reason) without a CUDA device under jax or under another Keras backend; the kernels are also
checked on CPU by test_kernels.py in the Pallas interpreter.

Precisions only the GPU runs (the interpreter multiplies float32 operands in float32 and has no inline assembly;
test_lowering.py checks on CPU that each reaches the kernels' Triton IR), exercised here and by test_kernels.py,
which runs compiled on a GPU (`bash scripts/gpu.sh tests` runs both):
  - tf32x3 products (float32 inputs): every float32 test here;
  - bf16 products, the state's operands rounded too (bfloat16 inputs, the engine's SETTINGS.low_precision "bf16"):
    the bfloat16 cases here;
  - tf32 products (float16 inputs; bfloat16 inputs with low_precision "tf32"): the float16 cases here,
    test_kernels.py::test_16bit_inputs[tf32-*];
  - f16 products (low_precision "f16"): test_kernels.py::test_16bit_inputs[input-float16];
  - exp as one ex2.approx.ftz (every kernel that exponentiates, every dtype): every test here.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv6_keras_operator import RWKVKernelOperator, engines
from rwkv6_keras_operator.engines import pallas
from rwkv6_keras_operator.engines.pallas import binding
from rwkv6_keras_operator.engines.pallas.settings import Settings
from rwkv6_keras_operator.reference import (wkv_reference, wkv_reference_grads, wkv_reference_varlen,
                                            wkv_reference_varlen_grads)
from tests.helpers import BF16, make_inputs, over_tolerance, rel_err, rounded, tolerances

pytestmark = pytest.mark.requires("pallas", "gpu")


def tolerance(dtype):
    """The float32 results of 16-bit runs: du is an element-wise float32 sum (float32-exact); the state and the
    gradient of init_state are sums of products whose operands are rounded (bf16 products round the state itself to
    bfloat16; float16 inputs multiply in tf32): BF16, and so are y and the other gradients (16-bit products)."""
    return tolerances(dtype) if dtype == "float32" else tolerances(dtype, values=BF16, states=BF16)


def check(B, T, H, N, decay, dtype, seed, n_state=None, state_map=None, with_grads=True, settings=None):
    x = make_inputs(B, T, H, N, seed, decay=decay, n_state=n_state)
    seen = {n: rounded(x[n], dtype) for n in "rkvw"}
    init = x.get("init_state")
    rng = np.random.default_rng(seed)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32)
    op = RWKVKernelOperator(N, T)
    args = [jnp.asarray(x[n]).astype(dtype) for n in "rkvw"] + [jnp.asarray(x["u"])]
    assert engines.select(args[0], N, False) is pallas
    if init is not None:
        args.append(jnp.asarray(init))

    def f(r, k, v, w, u, init=None):
        if settings is not None:
            y, s = binding.wkv(*(a.reshape(B, T, H, N) for a in (r, k, v, w)), u, init, settings=settings)
            return y.reshape(B, T, H * N), s
        return op(r, k, v, w, u, with_state=True, init_state=init, state_map=state_map)

    index = None if init is None else (state_map if state_map is not None else np.arange(B))
    y_ref, s_ref = wkv_reference(*(seen[n] for n in "rkvw"), x["u"], N, init, index)
    if not with_grads:
        y, s = jax.jit(f)(*args)
        errors = {"y": rel_err(np.asarray(y, np.float32), y_ref), "state": rel_err(s, s_ref)}
    else:
        (y, s), pullback = jax.vjp(jax.jit(f), *args)
        grads = pullback((jnp.asarray(dy, y.dtype), jnp.asarray(ds)))
        g_ref = wkv_reference_grads(*(seen[n] for n in "rkvw"), x["u"], N, dy, ds, init, index)
        errors = {"y": rel_err(np.asarray(y, np.float32), y_ref), "state": rel_err(s, s_ref)}
        for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
            errors[name] = rel_err(np.asarray(g, np.float32), g_ref[name])
    assert y.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32
    bad = over_tolerance(errors, tolerance(dtype))
    assert not bad, f"errors over tolerance: {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize("decay", ["normal", "strong", "masks"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes_and_decays(dtype, decay):
    check(2, 300, 2, 64, decay, dtype, seed=1, n_state=2)


@pytest.mark.parametrize("N", [16, 32, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_sizes(N, dtype):
    check(2, 200, 2, N, "masks", dtype, seed=N)


@pytest.mark.parametrize("keys", [16, 32])
@pytest.mark.parametrize("N,dtype", [(64, "float32"), (64, "bfloat16"), (128, "bfloat16"), (16, "float16")])
def test_fused_state_scan(N, dtype, keys):
    """The scan that builds each chunk's state terms as it goes (taken from 128 programs; forced here at a small
    shape), compiled, in the key blocks of few (16) and many (32) programs."""
    settings = Settings(state_scan_min_programs=0, state_scan_keys_few=keys)
    check(2, 300, 2, N, "masks", dtype, seed=N + 5, n_state=2, settings=settings)


def test_state_map_sums_gradients_of_shared_states():
    check(3, 100, 2, 64, "strong", "float32", seed=3, n_state=5, state_map=[4, 0, 4])


@pytest.mark.parametrize("T", [1, 7])
def test_decode_and_short(T):
    """T <= 16 under differentiation: the chunked forward of the vjp and its backward."""
    check(64, T, 4, 64, "masks", "bfloat16", seed=T, n_state=64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_decode_forward_only(T, dtype):
    """T <= decode_max_t without differentiation: the step-by-step kernel, and only it, compiled (element-wise
    float32: the state is float32-exact for bfloat16 inputs too)."""
    B, H, N = 64, 4, 64
    x = make_inputs(B, T, H, N, T, decay="masks", n_state=B)
    op = RWKVKernelOperator(N, T)
    args = [jnp.asarray(x[n]).astype(dtype) for n in "rkvw"] + [jnp.asarray(x["u"]), jnp.asarray(x["init_state"])]
    f = jax.jit(lambda r, k, v, w, u, s0: op(r, k, v, w, u, with_state=True, init_state=s0))
    assert set(re.findall(r"\bname=(wkv6_\w+)", str(jax.make_jaxpr(f)(*args)))) == {"wkv6_recurrent"}
    y, s = f(*args)
    y_ref, s_ref = wkv_reference(*(rounded(x[n], dtype) for n in "rkvw"), x["u"], N, x["init_state"])
    assert rel_err(np.asarray(y, np.float32), y_ref) <= tolerances(dtype)["y"]
    assert rel_err(s, s_ref) <= tolerances("float32")["state"]


@pytest.mark.parametrize("scan", ["fused", "terms then scan"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_sequences(dtype, scan):
    """Packed sequences (cu_seqlens), the engine's wkv_varlen compiled: documents of random lengths (one empty, one
    of one token, cuts inside and at chunk edges), per-sequence start states mapped from a pool; outputs, final
    states and every gradient against the float64 oracle, with each way of the state scan (one program per
    sequence): the fused kernel and state terms then the plain scan."""
    H, N = 4, 64
    rng = np.random.default_rng(7)
    lengths = np.concatenate([rng.integers(2, 200, 9), [0, 1, 32, 64]])
    rng.shuffle(lengths)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    T, n = int(cu[-1]), len(lengths)
    x = make_inputs(1, T, H, N, 11, decay="masks", n_state=3)
    state_map = rng.integers(0, 3, n)
    seen = {name: rounded(x[name], dtype) for name in "rkvw"}
    dy = rounded(rng.standard_normal((1, T, H * N)), dtype)
    ds = rng.standard_normal((n, H, N, N)).astype(np.float32)
    settings = Settings(state_scan_min_programs=0 if scan == "fused" else 1 << 30)
    args = [jnp.asarray(x[name]).astype(dtype) for name in "rkvw"] + [jnp.asarray(x["u"]), jnp.asarray(x["init_state"])]
    assert engines.select(args[0], N, False) is pallas

    def f(r, k, v, w, u, pool):
        y, s = binding.wkv_varlen(*(a.reshape(1, T, H, N) for a in (r, k, v, w)), u, pool[state_map],
                                  jnp.asarray(cu), settings=settings)
        return y.reshape(1, T, H * N), s

    (y, s), pullback = jax.vjp(jax.jit(f), *args)
    grads = pullback((jnp.asarray(dy, y.dtype), jnp.asarray(ds)))
    y_ref, s_ref = wkv_reference_varlen(*(seen[name] for name in "rkvw"), x["u"], N, cu, x["init_state"], state_map)
    g_ref = wkv_reference_varlen_grads(*(seen[name] for name in "rkvw"), x["u"], N, cu, dy, ds, x["init_state"],
                                       state_map)
    errors = {"y": rel_err(np.asarray(y, np.float32), y_ref), "state": rel_err(s, s_ref)}
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        errors[name] = rel_err(np.asarray(g, np.float32), g_ref[name])
    bad = over_tolerance(errors, tolerance(dtype))
    assert not bad, f"errors over tolerance: {bad} (all: {errors})"


def test_long_sequence_bf16():
    check(1, 4096 + 17, 2, 64, "normal", "bfloat16", seed=4, n_state=1, with_grads=False)


def test_vmap_jit_checkpoint():
    B, T, H, N = 2, 130, 2, 64
    x = make_inputs(B, T, H, N, 6, decay="masks", n_state=B)
    op = RWKVKernelOperator(N, T)

    def loss(r, w, init):
        y, s = op(r, jnp.asarray(x["k"]), jnp.asarray(x["v"]), w, jnp.asarray(x["u"]), with_state=True, init_state=init)
        return jnp.sum(y ** 2) + jnp.sum(s)

    r, w, init = jnp.asarray(x["r"]), jnp.asarray(x["w"]), jnp.asarray(x["init_state"])
    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(r, w, init)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(r, w, init)
    mapped = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(r[None].repeat(2, 0), w[None].repeat(2, 0),
                                                                   init[None].repeat(2, 0))
    for a, b, c in zip(plain, remat, mapped):
        assert rel_err(b, a) <= 1e-6 and rel_err(c[1], a) <= 1e-6
