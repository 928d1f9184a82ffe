"""The Pallas engine's one-step kernel for the decode step and the state pool: values against the float64 oracle,
and the proof that a step writes the state where it lies (no copy of the pool or of a carried state).

Without a CUDA GPU the kernel runs in the Pallas interpreter on the CPU; the in-place property is then checked in two
ways that need no GPU: the program jax lowers for CUDA (the kernel's state output aliases its state input, and a
donated pool is the program's output buffer), and, run in the interpreter, a donated pool's buffer comes back as the
output. On a CUDA machine the compiled program is checked too: XLA made no copy of the pool or the carried state.
"""
import re

import numpy as np
import pytest

from rwkv6_keras_operator.reference import wkv_reference
from tests.helpers import BACKEND, BF16, FP32_OUT, make_inputs, rel_err, rounded

if BACKEND != "jax":
    pytest.skip(f"the Pallas engine runs under the jax backend (KERAS_BACKEND={BACKEND})", allow_module_level=True)
jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas.triton", reason="this jax has no Pallas Triton backend")
import jax.numpy as jnp  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator, engines  # noqa: E402
from rwkv6_keras_operator.engines import pallas  # noqa: E402
from rwkv6_keras_operator.engines.pallas import common, recurrent  # noqa: E402
from rwkv6_keras_operator.engines.pallas import pool as pallas_pool  # noqa: E402
from rwkv6_keras_operator.engines.step_settings import StepSettings  # noqa: E402

TOL = {"float32": FP32_OUT, "bfloat16": BF16}
GPU = common.on_gpu()


@pytest.fixture
def forced(monkeypatch):
    """The operator picks the Pallas engine, run by the interpreter on the CPU (the compiled kernels: test_gpu.py)."""
    monkeypatch.setattr(common, "FORCE_INTERPRET", True)
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def pool_case(B, n, H, N, seed, dtype="float32"):
    x = make_inputs(B, 1, H, N, seed, decay="masks", n_state=n)
    slots = np.random.default_rng(seed).permutation(n)[:B]
    args = [jnp.asarray(x[c][:, 0]).astype(dtype) for c in "rkvw"] + [jnp.asarray(x["u"])]
    seen = [rounded(x[c], dtype) for c in "rkvw"]
    y_ref, s_ref = wkv_reference(*seen, x["u"], N, x["init_state"], slots)
    return x, slots, args, y_ref[:, 0], s_ref


@pytest.mark.parametrize("geometry", [StepSettings(), StepSettings(tile=128, min_columns=4)], ids=["default", "narrow"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pool_step_matches_oracle(forced, monkeypatch, geometry, dtype):
    """Random distinct slots: y and the advanced rows match the oracle, every other row keeps every bit (the narrow
    geometry: several value blocks a head)."""
    monkeypatch.setattr(recurrent, "STEP", geometry)
    jax.clear_caches()   # the geometry is read when the kernel is traced
    B, n, H, N = 3, 9, 2, 16
    x, slots, args, y_ref, s_ref = pool_case(B, n, H, N, seed=len(dtype), dtype=dtype)
    y, pool = pallas_pool.pool_step(*args, jnp.asarray(x["init_state"]), jnp.asarray(slots))
    assert y.dtype == jnp.dtype(dtype) and y.shape == (B, H * N)
    assert rel_err(np.asarray(y, np.float32), y_ref) <= TOL[dtype]
    assert rel_err(np.asarray(pool)[slots], s_ref) <= TOL[dtype]
    others = np.setdiff1d(np.arange(n), slots)
    assert np.array_equal(np.asarray(pool)[others], x["init_state"][others])
    jax.clear_caches()


def test_operator_step_picks_the_kernel(forced):
    B, n, H, N = 2, 4, 2, 16
    x, slots, args, y_ref, s_ref = pool_case(B, n, H, N, seed=3)
    op = RWKVKernelOperator(N)
    assert engines.select(args[0], N, False) is pallas
    y, pool = op.step(*args, jnp.asarray(x["init_state"]), slots)
    assert rel_err(np.asarray(y), y_ref) <= FP32_OUT and rel_err(np.asarray(pool)[slots], s_ref) <= FP32_OUT


def test_donated_pool_comes_back_in_its_own_buffer(forced):
    """Run (in the interpreter) with the pool donated: the output pool is the input's buffer, with the values."""
    B, n, H, N = 2, 6, 1, 16
    x, slots, args, y_ref, s_ref = pool_case(B, n, H, N, seed=4)
    op = RWKVKernelOperator(N)
    step = jax.jit(op.step, donate_argnums=5)
    pool = jnp.asarray(x["init_state"])
    address = pool.unsafe_buffer_pointer()
    y, out = step(*args, pool, jnp.asarray(slots, jnp.int32))
    assert pool.is_deleted() and out.unsafe_buffer_pointer() == address
    assert rel_err(np.asarray(out)[slots], s_ref) <= FP32_OUT


def cuda_program(fn, *args, donate=()):
    """The StableHLO jax makes of jit(fn) for CUDA (the Pallas kernels as Triton custom calls), here or on a GPU."""
    saved = common.interpret
    common.interpret = lambda: False
    jax.clear_caches()
    try:   # on the default backend's device: on a GPU machine the Triton lowering needs a GPU in context
        with jax.default_device(jax.devices()[0]):
            return jax.jit(fn, donate_argnums=donate).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        common.interpret = saved
        jax.clear_caches()


def kernel_aliases(program):
    """[(output index, operand index)] of each Triton kernel's output_operand_aliases in a lowered program."""
    found = []
    for line in program.splitlines():
        if "__gpu$xla.gpu.triton" in line:
            found.append([(int(o), int(i)) for o, i in re.findall(
                r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", line)])
    return found


def test_cuda_program_of_a_donated_pool_step_writes_in_place():
    """Lowered for CUDA: the kernel's pool output (1) aliases its pool operand (5), and the donated pool argument is
    the program's pool output: XLA needs no buffer for a second pool."""
    B, n, H, N = 2, 6, 2, 64
    x, slots, args, _, _ = pool_case(B, n, H, N, seed=5)
    op = RWKVKernelOperator(N)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "FORCE_INTERPRET", True)   # the operator picks Pallas; common.interpret is off in there
        program = cuda_program(op.step, *args, jnp.asarray(x["init_state"]), jnp.asarray(slots, jnp.int32), donate=5)
    assert kernel_aliases(program) == [[(1, 5)]]
    # the pool is touched by the kernel alone: no gather, scatter, slice or copy of it around the kernel
    pool_type = f"tensor<{n}x{H}x{N}x{N}xf32>"
    touching = [line.split("=")[1].split("(")[0].strip() for line in program.splitlines()
                if pool_type in line and "= " in line and "func.func" not in line]
    assert touching == ["stablehlo.custom_call @__gpu$xla.gpu.triton"], touching
    main = next(line for line in program.splitlines() if "func.func public @main" in line)
    pool_arg = re.search(rf"%arg5: {re.escape(pool_type)}[^,]*", main).group(0)
    # donated: aliased to output 1 (the pool), or left to XLA to alias (newer jax may say only that it is donated)
    assert "tf.aliasing_output = 1" in pool_arg or "jax.buffer_donor = true" in pool_arg, pool_arg


def scan_decode(op, T):
    """A jitted decode loop through op(...): the state carried by lax.scan, one token a step."""
    def run(state, r, k, v, w, u):
        def step(s, token):
            y, s = op(*token, u, with_state=True, init_state=s)
            return s, y
        return jax.lax.scan(step, state, (r, k, v, w))
    return run


def test_decode_loop_matches_oracle_and_carries_the_state_in_place(forced):
    """op(...) with T = 1 inside a jitted lax.scan: the oracle's values, and the CUDA program's step kernel writes the
    carried state over its input (no copy of the state each step)."""
    B, T, H, N = 2, 5, 2, 16
    x = make_inputs(B, T, H, N, 6, decay="masks", n_state=B)
    op = RWKVKernelOperator(N)
    tokens = [jnp.asarray(np.swapaxes(x[c], 0, 1)[:, :, None]) for c in "rkvw"]   # (T, B, 1, C)
    run = jax.jit(scan_decode(op, T))
    state, ys = run(jnp.asarray(x["init_state"]), *tokens, jnp.asarray(x["u"]))
    y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"])
    assert rel_err(np.swapaxes(np.asarray(ys)[:, :, 0], 0, 1), y_ref) <= FP32_OUT
    assert rel_err(np.asarray(state), s_ref) <= FP32_OUT
    program = cuda_program(scan_decode(op, T), jnp.asarray(x["init_state"]), *tokens, jnp.asarray(x["u"]))
    assert kernel_aliases(program) == [[(1, 5)]]


def test_eager_decode_leaves_its_state_argument_valid(forced):
    """Called eagerly, the step writes a new state and the caller's state stays as it was (no donation)."""
    B, H, N = 2, 1, 16
    x = make_inputs(B, 1, H, N, 7, decay="strong", n_state=B)
    op = RWKVKernelOperator(N)
    s0 = jnp.asarray(x["init_state"])
    y, s1 = op(*(jnp.asarray(x[c]) for c in "rkvw"), jnp.asarray(x["u"]), with_state=True, init_state=s0)
    assert not s0.is_deleted() and np.array_equal(np.asarray(s0), x["init_state"])
    y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"])
    assert rel_err(np.asarray(y), y_ref) <= FP32_OUT and rel_err(np.asarray(s1), s_ref) <= FP32_OUT


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: XLA compiles the program for it")
def test_compiled_programs_make_no_copy_of_the_states():
    """On the GPU: the compiled pool step (pool donated) and the decode loop hold no copy of a pool- or state-sized
    buffer."""
    B, n, H, N = 4, 64, 2, 64
    x, slots, args, _, _ = pool_case(B, n, H, N, seed=8)
    op = RWKVKernelOperator(N)
    pool_shape = f"f32[{n},{H},{N},{N}]"
    hlo = jax.jit(op.step, donate_argnums=5).lower(*args, jnp.asarray(x["init_state"]),
                                                    jnp.asarray(slots, jnp.int32)).compile().as_text()
    assert not [line for line in hlo.splitlines() if " copy(" in line and pool_shape in line], hlo
    T = 3
    xs = make_inputs(B, T, H, N, 9, n_state=B)
    tokens = [jnp.asarray(np.swapaxes(xs[c], 0, 1)[:, :, None]) for c in "rkvw"]
    hlo = jax.jit(scan_decode(op, T), donate_argnums=0).lower(jnp.asarray(xs["init_state"]), *tokens,
                                                              jnp.asarray(xs["u"])).compile().as_text()
    state_shape = f"f32[{B},{H},{N},{N}]"
    assert not [line for line in hlo.splitlines() if " copy(" in line and state_shape in line], hlo


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (a pool of 8.6 GB)")
def test_pool_past_two_to_the_31_elements():
    """A pool of more than 2^31 floats (offsets past int32), donated: the last slots step as they do alone."""
    H, N = 32, 64
    n = 2**31 // (H * N * N) + 4
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0) < n * H * N * N * 4 * 1.3:
        pytest.skip("not enough free GPU memory for the pool")
    B = 2
    x = make_inputs(B, 1, H, N, 13, decay="strong", n_state=B)
    slots = np.array([n - 1, n - 3], np.int32)
    pool = jnp.zeros((n, H, N, N), jnp.float32).at[slots].set(jnp.asarray(x["init_state"]))
    op = RWKVKernelOperator(N)
    step = jax.jit(op.step, donate_argnums=5)
    y, pool = step(*(jnp.asarray(x[c][:, 0]) for c in "rkvw"), jnp.asarray(x["u"]), pool, jnp.asarray(slots))
    y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"])
    assert rel_err(np.asarray(y), y_ref[:, 0]) <= FP32_OUT
    assert rel_err(np.asarray(pool[slots]), s_ref) <= FP32_OUT
    assert int(jnp.count_nonzero(pool[: n - 3])) == 0


def test_state_still_used_after_an_in_place_step_keeps_its_values(forced):
    """Inside jit the step writes over its state input; where the caller still uses that state afterwards, XLA
    copies it first: both the old and the new state come out right."""
    B, H, N = 2, 1, 16
    x = make_inputs(B, 1, H, N, 10, decay="masks", n_state=B)
    op = RWKVKernelOperator(N)

    def both(s, r, k, v, w, u):
        y, s1 = op(r, k, v, w, u, with_state=True, init_state=s)
        return s, s1

    old, new = jax.jit(both)(jnp.asarray(x["init_state"]), *(jnp.asarray(x[c]) for c in "rkvw"), jnp.asarray(x["u"]))
    assert np.array_equal(np.asarray(old), x["init_state"])
    _, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"])
    assert rel_err(np.asarray(new), s_ref) <= FP32_OUT
