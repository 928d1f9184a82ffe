"""The Triton engine on a CUDA GPU, through RWKVKernelOperator: dtypes, decays, state forms, head sizes, lengths,
torch.compile(fullgraph=True), CUDA-graph capture and 64-bit indexing, all against the float64 oracle.

Skipped (with the reason) without a CUDA device or under another Keras backend; the kernels themselves are
also checked on CPU by test_kernels.py under the Triton interpreter.

Precisions only the GPU runs (the interpreter multiplies every tile in IEEE float32: its bfloat16 `tl.dot` is wrong,
it ignores tf32, and runs no inline assembly), exercised here and by test_kernels.py, which runs compiled on a GPU
(`bash scripts/gpu.sh tests` runs both; test_precisions_by_dtype checks the mapping):
  - tf32x3 products (float32 inputs): every float32 test;
  - bf16 products, the state's operands rounded too, chunk states stored in bfloat16 (bfloat16 inputs): the
    bfloat16 cases of test_dtypes_and_decays, test_head_sizes, test_long_bf16_sequence;
  - tf32 products (float16 inputs): the float16 cases of test_dtypes_and_decays;
  - exp as one ex2.approx.ftz (common.FAST_EXP, every dtype): every test here.
"""
import warnings

import numpy as np
import pytest
import torch

from rwkv6_keras_operator import RWKVKernelOperator, engines
from rwkv6_keras_operator.engines import portable
from rwkv6_keras_operator.engines import triton as engine
from rwkv6_keras_operator.engines.triton import binding, common
from rwkv6_keras_operator.engines.triton.settings import ScanLaunch, Settings
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BF16, make_inputs, over_tolerance, rel_err, rounded, tolerances

pytestmark = pytest.mark.requires("triton", "gpu")

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tolerance(dtype):
    """The float32 results of 16-bit runs: du is an element-wise float32 sum (float32-exact); the state and the
    gradient of init_state are sums of products whose operands are rounded (bf16 products round the state itself to
    bfloat16; float16 inputs multiply in tf32): BF16, and so are y and the other gradients (16-bit products)."""
    return tolerances(dtype) if dtype == "float32" else tolerances(dtype, values=BF16, states=BF16)


def cuda(x, dtype=torch.float32):
    return torch.tensor(np.asarray(x), device="cuda").to(dtype)


def operator_check(B, T, H, N, decay, dtype="float32", init=None, init_arg=None, state_map=None, seed=0):
    """Operator output, final state and all gradients vs the oracle. init: NumPy states for the oracle;
    init_arg: what the operator gets (a reshaped or mapped form of init)."""
    x = make_inputs(B, T, H, N, seed, decay=decay)
    x.update({n: rounded(x[n], dtype) for n in "rkvw"})
    rng = np.random.default_rng(seed + 1)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)   # the cotangent of y has y's dtype
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32)
    leaves = [cuda(x[n], DT[dtype]).requires_grad_(True) for n in "rkvw"] + [cuda(x["u"]).requires_grad_(True)]
    if init is not None:
        leaves.append(cuda(init_arg if init_arg is not None else init).requires_grad_(True))
    op = RWKVKernelOperator(N, max_sequence_length=T)
    assert engines.select(leaves[0].view(B, T, H, N), N, False) is engine
    y, state = op(*leaves[:5], with_state=True, init_state=leaves[5] if init is not None else None,
                  state_map=state_map)
    loss = (y.float() * cuda(dy)).sum() + (state * cuda(dstate)).sum()
    grads = torch.autograd.grad(loss, leaves)
    sm = None if state_map is None else np.asarray(torch.as_tensor(state_map).cpu())
    y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, init, sm)
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, dstate, init, sm)
    np_ = lambda a: a.detach().float().cpu().numpy()  # noqa: E731
    errors = {"y": rel_err(np_(y), y_ref), "state": rel_err(np_(state), s_ref)}
    names = ["r", "k", "v", "w", "u"] + (["init_state"] if init is not None else [])
    for n, g in zip(names, grads):
        want = g_ref[n]
        errors[n] = rel_err(np_(g).reshape(want.shape), want)
    bad = over_tolerance(errors, tolerance(dtype))
    assert not bad, f"over tolerance: {bad} (all: {errors})"
    assert y.dtype == DT[dtype] and state.dtype == torch.float32
    return errors


@pytest.mark.parametrize("dtype, products", [("float32", "tf32x3"), ("bfloat16", "bf16"), ("float16", "tf32")])
def test_precisions_by_dtype(dtype, products):
    """The products each dtype's kernels take on the GPU, and exp as ex2.approx (the modes listed above)."""
    assert binding.precisions(torch.zeros(1, device="cuda", dtype=DT[dtype])).prec.value == products
    assert common.FAST_EXP


@pytest.mark.parametrize("decay", ["normal", "strong", "masks"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes_and_decays(dtype, decay):
    s = make_inputs(2, 1, 4, 64, 9, n_state=2)["init_state"]
    operator_check(2, 333, 4, 64, decay, dtype, init=s)


STATE_FORMS = {  # name: (n_state, how the operator gets it, state_map)
    "(H,N,N) shared": (1, lambda s: s[0], None),
    "(1,H,N,N) shared": (1, lambda s: s, None),
    "(B,H,N,N) per row": (3, lambda s: s, None),
    "(5,H,N,N) + tensor map": (5, lambda s: s, "tensor"),
    "(5,H,N,N) + list map": (5, lambda s: s, [4, 4, 1]),
}


@pytest.mark.parametrize("form", list(STATE_FORMS))
def test_state_forms(form):
    n, arg, state_map = STATE_FORMS[form]
    s = make_inputs(1, 1, 2, 64, 4, n_state=n)["init_state"]
    if state_map == "tensor":
        state_map = torch.tensor([2, 0, 2], dtype=torch.int32, device="cuda")
    operator_check(3, 150, 2, 64, "masks", init=s, init_arg=arg(s), state_map=state_map)


@pytest.mark.parametrize("N", [16, 32, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_sizes(N, dtype):
    s = make_inputs(2, 1, 2, N, 5, n_state=2)["init_state"]
    operator_check(2, 200, 2, N, "strong", dtype, init=s)


@pytest.mark.parametrize("T", [1, 2, 17, 64, 65, 1000])
def test_lengths(T):
    s = make_inputs(2, 1, 2, 64, 6, n_state=2)["init_state"]
    operator_check(2, T, 2, 64, "masks", init=s)


def test_long_bf16_sequence():
    """T = 4096 in bf16 with strong decays: nothing drifts along many chunks."""
    operator_check(1, 4096, 2, 64, "strong", "bfloat16")


def test_unsupported_head_size_warns_and_runs_portable():
    r = torch.zeros(1, 4, 1, 48, device="cuda")
    engine._warned.discard(48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not engine.supports(r, 48)
        assert not engine.supports(r, 48)
    assert len([w for w in caught if "head_size=48" in str(w.message)]) == 1
    assert engines.select(r, 48, False) is portable


def test_ops_loop_single_step_runs_portable():
    r = torch.zeros(2, 1, 1, 64, device="cuda")
    assert engines.select(r, 64, True) is portable
    assert engines.select(r, 64, False) is engine


def _engine_step(r, k, v, w, u, s0):
    y, s = engine.wkv(r, k, v, w, u, s0)
    return y.float().square().sum() + s.square().sum()


def _inputs(B, T, H, N, dtype=torch.bfloat16, seed=0):
    x = make_inputs(B, T, H, N, seed, decay="masks", n_state=B)
    ts = [cuda(x[n], dtype).view(B, T, H, N).requires_grad_(True) for n in "rkvw"]
    return ts + [cuda(x["u"]).requires_grad_(True), cuda(x["init_state"]).requires_grad_(True)]


def test_torch_compile_fullgraph_engine():
    """The custom op inside torch.compile(fullgraph=True): same values and gradients as eager."""
    args = _inputs(2, 130, 2, 64)
    eager = torch.autograd.grad(_engine_step(*args), args)
    compiled = torch.compile(_engine_step, fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_operator():
    """The whole operator (argument checks, init_state gather through a tensor state_map) under fullgraph."""
    B, T, H, N = 3, 100, 2, 64
    x = make_inputs(B, T, H, N, 2, decay="masks", n_state=4)
    op = RWKVKernelOperator(N)
    state_map = torch.tensor([3, 0, 3], device="cuda", dtype=torch.int32)

    def f(r, k, v, w, u, s):
        y, state = op(r, k, v, w, u, with_state=True, init_state=s, state_map=state_map)
        return y.float().square().sum() + state.square().sum()

    args = [cuda(x[n]).requires_grad_(True) for n in "rkvwu"] + [cuda(x["init_state"]).requires_grad_(True)]
    eager = torch.autograd.grad(f(*args), args)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*args), args)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_graph_capture():
    """Forward (decode step and a chunked call) and forward + backward captured in CUDA graphs and replayed."""
    args = _inputs(2, 100, 2, 64, torch.float32)
    dec = _inputs(4, 1, 2, 64, torch.float32, seed=1)
    static = [a.detach().clone() for a in dec]
    op = RWKVKernelOperator(64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compiles the kernels outside the capture)
            loss = _engine_step(*args)
            torch.autograd.grad(loss, args)
            with torch.no_grad():
                op(*(a.reshape(4, 1, -1) for a in static[:4]), static[4], with_state=True, init_state=static[5])
    torch.cuda.current_stream().wait_stream(stream)
    g_train, g_dec = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_train):
        grads = torch.autograd.grad(_engine_step(*args), args)
    with torch.no_grad(), torch.cuda.graph(g_dec):
        y_dec, s_dec = op(*(a.reshape(4, 1, -1) for a in static[:4]), static[4], with_state=True,
                          init_state=static[5])
    for _ in range(2):
        fresh = _inputs(2, 100, 2, 64, torch.float32, seed=7)
        with torch.no_grad():
            for a, b in zip(args, fresh):
                a.copy_(b)
            for a, b in zip(static, _inputs(4, 1, 2, 64, torch.float32, seed=8)):
                a.copy_(b)
        g_train.replay()
        g_dec.replay()
        want = torch.autograd.grad(_engine_step(*args), args)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():
            y_want, s_want = op(*(a.reshape(4, 1, -1) for a in static[:4]), static[4], with_state=True,
                                init_state=static[5])
        torch.testing.assert_close(y_dec, y_want, rtol=0, atol=0)
        torch.testing.assert_close(s_dec, s_want, rtol=0, atol=0)


def test_int64_offsets_and_large_grids():
    """B*T*C > 2^31 elements (offsets past int32) and > 65535 programs: the last row equals that row alone."""
    B, T, H, N = 9, 131072, 32, 64
    need = B * T * H * N * (2 * 5 + 8)   # r, k, v, w, y in bf16; float32 chunk states (N x N per 32 rows: 8 bytes)
    if torch.cuda.get_device_properties(0).total_memory < need * 1.3:
        pytest.skip(f"needs about {need * 1.3 / 2**30:.0f} GiB of GPU memory")
    assert B * T * H * N > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, device="cuda", generator=g, dtype=torch.bfloat16) * 0.5 for _ in range(3))
    w = torch.randn(B, T, H, N, device="cuda", generator=g, dtype=torch.bfloat16) - 1
    u = torch.randn(H, N, device="cuda", generator=g) * 0.5
    # the same scan settings for both calls (by default the lone row would get a segmented scan: other roundings)
    settings = Settings(scan=ScanLaunch(32, 64, 4, 3), segments=1)
    with torch.no_grad():
        y, s = binding.wkv(r, k, v, w, u, None, settings)
        y1, s1 = binding.wkv(*(a[-1:].clone() for a in (r, k, v, w)), u, None, settings)
    assert torch.equal(y[-1:], y1) and torch.equal(s[-1:], s1)
    assert torch.isfinite(y[-1]).all()
