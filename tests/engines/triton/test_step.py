"""The Triton engine's one-step kernel for the decode step and the state pool, against the float64 oracle.

On a CPU machine the kernel runs under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors; on a CUDA machine
compiled on the GPU. The step kernel has no tl.dot, so bfloat16 inputs are exact under the interpreter too.
"""
import os

import numpy as np
import pytest

from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BACKEND, BF16, FP32_GRAD, FP32_OUT, make_inputs, rel_err, rounded

if BACKEND != "torch":
    pytest.skip(f"the Triton engine runs under the torch backend (KERAS_BACKEND={BACKEND})", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="Triton is not installed")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to check the Triton kernels on CPU",
                allow_module_level=True)

from rwkv6_keras_operator import RWKVKernelOperator, engines  # noqa: E402
from rwkv6_keras_operator.engines import triton as engine  # noqa: E402
from rwkv6_keras_operator.engines.step_settings import StepSettings  # noqa: E402
from rwkv6_keras_operator.engines.triton import binding, pool, recurrent  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {"float32": FP32_OUT, "bfloat16": BF16}


def dev(x, dtype=torch.float32):
    return torch.tensor(np.asarray(x), device=DEVICE).to(dtype)


@pytest.fixture
def settings(request, monkeypatch):
    """recurrent.STEP replaced for one test (the launch reads it at each call)."""
    monkeypatch.setattr(recurrent, "STEP", request.param)
    return request.param


GEOMETRIES = [StepSettings(), StepSettings(tile=256, per_thread=8, min_columns=4), StepSettings(tile=2048)]


@pytest.mark.parametrize("settings", GEOMETRIES, indirect=True, ids=["default", "narrow", "whole-rows"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N", [16, 64])
def test_pool_step_in_place(settings, dtype, N):
    """Random distinct slots of a pool: y and the advanced rows match the oracle, the other rows keep every bit, the
    pool tensor is updated where it lies; several column blocks a head with the narrow geometry."""
    B, H, n = 3, 2, 8
    x = make_inputs(B, 1, H, N, N, decay="masks", n_state=n)
    slots = np.random.default_rng(N).permutation(n)[:B]
    states = dev(x["init_state"])
    address = states.data_ptr()
    y, out = pool.pool_step(*(dev(x[c][:, 0], DT[dtype]) for c in "rkvw"), dev(x["u"]), states,
                            dev(slots, torch.int64))
    assert out is states and out.data_ptr() == address
    seen = [rounded(x[c], dtype) for c in "rkvw"]
    y_ref, s_ref = wkv_reference(*seen, x["u"], N, x["init_state"], slots)
    assert y.dtype == DT[dtype] and y.shape == (B, H * N)
    assert rel_err(y.float().cpu().numpy(), y_ref[:, 0]) <= TOL[dtype]
    assert rel_err(out.cpu().numpy()[slots], s_ref) <= TOL[dtype]
    others = np.setdiff1d(np.arange(n), slots)
    assert np.array_equal(out.cpu().numpy()[others], x["init_state"][others])


@pytest.mark.parametrize("start", ["none", "rows", "shared (stride 0)"])
def test_decode_on_channels(start):
    """binding.decode on (B, 1, C) tensors, without gradients: the start state absent, one per row, or one state
    broadcast to every row (read with a row stride of 0, not copied)."""
    B, H, N = 3, 2, 32
    x = make_inputs(B, 1, H, N, 5, decay="strong", n_state=B)
    init = {"none": None, "rows": x["init_state"], "shared (stride 0)": x["init_state"][:1]}[start]
    s0 = None if init is None else dev(init)
    if start == "shared (stride 0)":
        s0 = s0.expand(B, H, N, N)
        assert s0.stride(0) == 0 and recurrent.rows_contiguous(s0)
    with torch.no_grad():
        y, state = binding.decode(*(dev(x[c]) for c in "rkvw"), dev(x["u"]), s0)
    y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, init)
    assert y.shape == (B, 1, H * N)
    assert rel_err(y.cpu().numpy(), y_ref) <= FP32_OUT and rel_err(state.cpu().numpy(), s_ref) <= FP32_OUT


def test_decode_with_gradients_goes_through_the_custom_op():
    """With gradients wanted, decode runs the differentiable custom op: the gradients of y's sum to r and s0."""
    B, H, N = 2, 1, 16
    x = make_inputs(B, 1, H, N, 6, decay="masks", n_state=B)
    r, s0 = dev(x["r"]).requires_grad_(True), dev(x["init_state"]).requires_grad_(True)
    y, _ = binding.decode(r, *(dev(x[c]) for c in "kvw"), dev(x["u"]), s0)
    assert y.shape == (B, 1, H * N)
    grad_r, grad_s0 = torch.autograd.grad(y.sum(), (r, s0))
    want = wkv_reference_grads(*(x[c] for c in "rkvwu"), N, np.ones((B, 1, H * N)), None, x["init_state"])
    assert rel_err(grad_r.cpu().numpy(), want["r"]) <= FP32_GRAD
    assert rel_err(grad_s0.cpu().numpy(), want["init_state"]) <= FP32_GRAD


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The operator's dispatch picks the Triton engine for CPU tensors (the interpreter runs it)."""
    if not CUDA:
        monkeypatch.setattr(engine, "_AVAILABLE", True)
        monkeypatch.setattr(engine, "supports", lambda r, head_size: True)
    engines._CHOSEN.clear()
    yield
    engines._CHOSEN.clear()


def test_operator_decode_and_step_use_the_kernel(triton_on_cpu, monkeypatch):
    """op(...) with T == 1 and op.step both launch the step kernel (and give the oracle's values)."""
    launches = []
    launch = recurrent.launch_step
    monkeypatch.setattr(recurrent, "launch_step", lambda *a, **k: launches.append(k.get("slots")) or launch(*a, **k))
    monkeypatch.setattr(pool, "launch_step", recurrent.launch_step)
    B, H, N, n = 2, 2, 16, 5
    x = make_inputs(B, 1, H, N, 7, decay="masks", n_state=n)
    op = RWKVKernelOperator(N)
    with torch.no_grad():
        y, state = op(*(dev(x[c]) for c in "rkvw"), dev(x["u"]), with_state=True, init_state=dev(x["init_state"]),
                      state_map=[4, 1])
        states = dev(x["init_state"])
        y2, out = op.step(*(dev(x[c][:, 0]) for c in "rkvw"), dev(x["u"]), states, [4, 1])
    assert len(launches) == 2 and launches[0] is None and launches[1] is not None
    y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"], [4, 1])
    assert rel_err(y.cpu().numpy(), y_ref) <= FP32_OUT and rel_err(state.cpu().numpy(), s_ref) <= FP32_OUT
    assert rel_err(y2.cpu().numpy(), y_ref[:, 0]) <= FP32_OUT and rel_err(out.cpu().numpy()[[4, 1]], s_ref) <= FP32_OUT
    assert out is states


def test_step_and_decode_under_torch_compile(triton_on_cpu):
    """op.step and a one-token op(...) inside torch.compile(fullgraph=True): the pool is still updated in place, and
    both give exactly the eager values (on CPU with the aot_eager backend: no code generation, the custom ops run
    under the interpreter)."""
    B, H, N, n = 3, 2, 16, 8
    x = make_inputs(B, 1, H, N, 12, decay="masks", n_state=n)
    op = RWKVKernelOperator(N)
    args = [dev(x[c][:, 0]) for c in "rkvw"] + [dev(x["u"])]
    slots = dev([5, 1, 6], torch.int64)
    eager_pool, compiled_pool = dev(x["init_state"]), dev(x["init_state"])
    backend = "inductor" if CUDA else "aot_eager"
    torch._dynamo.reset()
    y_eager, _ = op.step(*args, eager_pool, slots)
    y_compiled, out = torch.compile(op.step, fullgraph=True, backend=backend)(*args, compiled_pool, slots)
    assert out is compiled_pool
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_pool, eager_pool, rtol=0, atol=0)
    s0 = dev(x["init_state"][:B])

    def decode(r, k, v, w, u):
        return op(r, k, v, w, u, with_state=True, init_state=s0)

    tokens = [a[:, None] for a in args[:4]]
    with torch.no_grad():
        want = decode(*tokens, args[4])
        got = torch.compile(decode, fullgraph=True, backend=backend)(*tokens, args[4])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pool_step_custom_op_registration():
    """Schema (the pool is declared mutated) and fake implementation of the pool step's custom op."""
    B, H, N, n = 2, 1, 16, 3
    x = make_inputs(B, 1, H, N, 8, n_state=n)
    args = [dev(x[c][:, 0]) for c in "rkvw"] + [dev(x["u"]), dev(x["init_state"]), dev([2, 0], torch.int32)]
    torch.library.opcheck(pool.pool_step_op, args, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------ on a CUDA GPU only
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@needs_cuda
def test_pool_step_in_a_cuda_graph():
    """op.step captured in a CUDA graph (slots on the GPU): each replay advances the captured rows of the pool in
    place, as eager steps do."""
    B, H, N, n = 4, 2, 64, 16
    x = make_inputs(B, 1, H, N, 9, decay="masks", n_state=n)
    op = RWKVKernelOperator(N)
    static = [dev(x[c][:, 0]) for c in "rkvw"] + [dev(x["u"])]
    slots = dev([7, 0, 12, 3], torch.int32)
    states, expected = dev(x["init_state"]), dev(x["init_state"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op.step(*static, expected, slots)             # warm up: compiles, checks the slots once
    torch.cuda.current_stream().wait_stream(stream)
    expected.copy_(states)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, out = op.step(*static, states, slots)
    assert out is states
    for seed in (10, 11):
        fresh = make_inputs(B, 1, H, N, seed, decay="masks")
        for a, c in zip(static, "rkvw"):
            a.copy_(dev(fresh[c][:, 0]))
        graph.replay()
        y_want, _ = op.step(*static, expected, slots)
        torch.testing.assert_close(y, y_want, rtol=0, atol=0)
        torch.testing.assert_close(states, expected, rtol=0, atol=0)


@needs_cuda
def test_pool_past_two_to_the_31_elements():
    """A pool of more than 2^31 floats (offsets past int32): the last slots step as they do alone."""
    H, N = 32, 64
    n = 2**31 // (H * N * N) + 4
    if torch.cuda.get_device_properties(0).total_memory < n * H * N * N * 4 * 1.3:
        pytest.skip(f"needs about {n * H * N * N * 4 * 1.3 / 2**30:.0f} GiB of GPU memory")
    B = 2
    x = make_inputs(B, 1, H, N, 13, decay="strong", n_state=B)
    states = torch.zeros((n, H, N, N), device="cuda")
    slots = [n - 1, n - 3]
    states[slots] = dev(x["init_state"])
    y, out = pool.pool_step(*(dev(x[c][:, 0]) for c in "rkvw"), dev(x["u"]), states, dev(slots, torch.int64))
    y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"])
    assert rel_err(y.cpu().numpy(), y_ref[:, 0]) <= FP32_OUT
    assert rel_err(out[slots].cpu().numpy(), s_ref) <= FP32_OUT
    assert int(torch.count_nonzero(out[: n - 3])) == 0
