"""The Triton engine's kernels against the float64 oracle: forward output, final state and every gradient.

On a CUDA machine they run compiled on the GPU; on a CPU machine the same kernels run under the Triton
interpreter (TRITON_INTERPRET=1, set by scripts/test.sh) on CPU tensors, at tiny shapes. The interpreter multiplies
in IEEE float32 whatever the dtype (binding.precisions: its bfloat16 `tl.dot` is wrong, and it
ignores tf32), so 16-bit inputs there check everything but the products' rounding, which the GPU tests cover
(test_gpu.py). The engine is called directly (the operator picks it only for CUDA tensors, see the `gpu_engine`
fixture of tests/conftest.py).
"""
import numpy as np
import pytest
import torch

from rwkv6_keras_operator.engines import triton as engine
from rwkv6_keras_operator.engines.triton import binding
from rwkv6_keras_operator.engines.triton.settings import Settings
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads
from tests.helpers import BF16, FP32_GRAD, FP32_OUT, make_inputs, over_tolerance, rel_err, rounded, tolerances

pytestmark = pytest.mark.requires("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(x, dtype="float32", init=None, state_map=None, dy=None, dstate=None, settings=None):
    """Engine output, final state and gradients (r, k, v, w, u, init) of sum(y * dy) + sum(state * dstate).

    init: (n, H, N, N) NumPy start states; row b starts from init[state_map[b]] (the gather the operator does).
    settings: launch settings (settings.Settings) for binding.wkv; None: the engine's own wkv."""
    B, T, C = x["r"].shape
    H, N = x["u"].shape
    dt = TORCH_DTYPES[dtype]
    leaves = [torch.tensor(x[n], device=DEVICE).to(dt).requires_grad_(True) for n in "rkvw"]
    leaves.append(torch.tensor(x["u"], device=DEVICE).requires_grad_(True))
    s0 = None
    if init is not None:
        leaves.append(torch.tensor(init, device=DEVICE).requires_grad_(True))
        index = torch.tensor(np.arange(B) if state_map is None else np.asarray(state_map), device=DEVICE)
        s0 = leaves[-1][index]
    r, k, v, w = (a.view(B, T, H, N) for a in leaves[:4])
    if settings is None:
        y, state = engine.wkv(r, k, v, w, leaves[4], s0)
    else:
        y, state = binding.wkv(r, k, v, w, leaves[4], s0, settings)
    loss = (y.float().reshape(B, T, C) * torch.tensor(dy, device=DEVICE)).sum()
    if dstate is not None:
        loss = loss + (state * torch.tensor(dstate, device=DEVICE)).sum()
    grads = torch.autograd.grad(loss, leaves)
    as_np = lambda a: a.detach().float().cpu().numpy().astype(np.float64)  # noqa: E731
    assert y.dtype == dt and y.shape == (B, T, H, N) and state.dtype == torch.float32
    return as_np(y).reshape(B, T, C), as_np(state), [as_np(g) for g in grads]


def tolerance(dtype):
    """Interpreted, every result of a 16-bit run is held to the tolerance of the dtype it comes back in (the float32
    ones to float32's: the products are IEEE float32; 16-bit inputs take 16 bits of each g in the decays' sums,
    which moves the state by ~1e-6, and bfloat16 inputs store their chunk states in bfloat16, which only the
    bfloat16 results read). Compiled, 16-bit runs multiply bf16 or tf32 operands, the state's too: BF16 for all but
    du (element-wise float32), as test_gpu.py."""
    if dtype == "float32" or not CUDA:
        return tolerances(dtype)
    return tolerances(dtype, values=BF16, states=BF16)


def check(B, T, H, N, decay, dtype="float32", n_state=None, state_map=None, with_dstate=True, seed=0, settings=None):
    """The engine against the oracle; with_dstate=False: a loss on y alone (the state gets no cotangent)."""
    x = make_inputs(B, T, H, N, seed, decay=decay, n_state=n_state)
    x.update({n: rounded(x[n], dtype) for n in "rkvw"})
    rng = np.random.default_rng(seed + 1)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)   # the cotangent of y has y's dtype
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32) if with_dstate else None
    init = x.get("init_state")
    y, state, grads = run(x, dtype, init, state_map, dy, dstate, settings)
    y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, init, state_map)
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, dstate, init, state_map)
    errors = {"y": rel_err(y, y_ref), "state": rel_err(state, s_ref)}
    names = ["r", "k", "v", "w", "u"] + (["init_state"] if init is not None else [])
    errors.update({n: rel_err(g, g_ref[n]) for n, g in zip(names, grads)})
    bad = over_tolerance(errors, tolerance(dtype))
    assert not bad, f"errors over tolerance: {bad} (all: {errors})"
    return errors


# Shapes: T = 80 and 150 span 3 and 5 chunks of 32 with a partial last chunk; T = 64 is two exact chunks.
@pytest.mark.parametrize("decay,B,T,H,N,n_state,state_map", [
    ("masks", 2, 80, 1, 32, 3, [2, 2]),        # shared start state through state_map: its gradient adds up
    ("strong", 1, 64, 2, 16, None, None),      # one exact chunk, no start state
    ("normal", 1, 150, 1, 16, 1, [0]),         # three chunks, the scan carries the state
])
def test_matches_oracle(decay, B, T, H, N, n_state, state_map):
    check(B, T, H, N, decay, n_state=n_state, state_map=state_map)


@pytest.mark.parametrize("with_state", [True, False])
def test_single_step(with_state):
    """T == 1 runs the one-step kernel forward (decode); its gradients go through the chunked backward."""
    check(2, 1, 1, 32, "masks", n_state=2 if with_state else None, with_dstate=with_state)


@pytest.mark.parametrize("N", [64, 128])
def test_head_sizes(N):
    check(1, 20, 1, N, "strong", n_state=1)


@pytest.mark.parametrize("settings", [None, Settings(backward_split=True)], ids=["fused backward", "split backward"])
def test_extreme_decays(settings):
    """w at -1e9 (decay 1), around the clamp (30, 59.9, 60.1, 1e4: decay 0), and -inf-free gradients."""
    B, T, H, N = 1, 40, 1, 16
    x = make_inputs(B, T, H, N, 7, decay="masks", n_state=1)
    rng = np.random.default_rng(8)
    w = x["w"].copy()
    for value in (-1e9, 30.0, 59.9, 60.1, 1e4):
        w[rng.random(w.shape) < 0.06] = value
    x["w"] = w
    dy = rng.standard_normal((B, T, H * N)).astype(np.float32)
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32)
    y, state, grads = run(x, "float32", x["init_state"], None, dy, dstate, settings)
    y_ref, s_ref = wkv_reference(*(x[n] for n in "rkvwu"), N, x["init_state"])
    g_ref = wkv_reference_grads(*(x[n] for n in "rkvwu"), N, dy, dstate, x["init_state"])
    assert rel_err(y, y_ref) <= FP32_OUT and rel_err(state, s_ref) <= FP32_OUT
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        assert rel_err(g, g_ref[name]) <= FP32_GRAD, name
    assert np.all(grads[3][w.reshape(grads[3].shape) > 30] == 0.0), "dw must be 0 where the decay is 0"


@pytest.mark.parametrize("G", [2, 3])
def test_segmented_scan(G):
    """The scan cut into G segments scanned at once (long sequences, few heads), combined and fixed up after:
    T = 300 is 10 chunks, so G = 3 gives segments of 4, 4 and 2 chunks. bfloat16: the stored chunk states are
    bfloat16 (Precisions.states_dtype), fixed up in float32."""
    settings = Settings(segments=G)
    check(2, 300, 1, 16, "masks", n_state=3, state_map=[2, 0], settings=settings)
    check(1, 290, 1, 32, "strong", n_state=1, settings=settings)
    check(1, 300, 1, 16, "masks", dtype="bfloat16", n_state=1, settings=settings)


@pytest.mark.parametrize("L,C", [(64, 32), (128, 32), (64, 16)])
def test_sub_blocks_of_longer_chunks(L, C):
    """Chunks of several sub-blocks (a benchmark setting): each program carries the chunk's start state forward and
    the end state's gradient backward to its own sub-block (sub_blocks.step_over)."""
    check(2, 150, 1, 32, "masks", n_state=2, settings=Settings(chunk=L, sub_block=C))


def test_unused_outputs_get_no_zero_gradients(monkeypatch):
    """A backward through y alone passes dstate = None to the backward op: autograd must not build zero gradients
    for the final state and the saved chunk states (a memset of every state, 537 MB at the training shape)."""
    seen = []
    backward_op = binding.backward_op
    monkeypatch.setattr(binding, "backward_op", lambda *a: seen.append(a[8]) or backward_op(*a))   # a[8]: dstate
    ts = [torch.randn(1, 40, 1, 16, device=DEVICE, requires_grad=True) for _ in range(4)]
    ts.append(torch.randn(1, 16, device=DEVICE, requires_grad=True))
    y, _ = binding.wkv(*ts, None)
    y.sum().backward()
    assert seen == [None]
    y, state = binding.wkv(*ts, None)
    (y.sum() + state.sum()).backward()
    assert seen[1] is not None and seen[1].shape == (1, 1, 16, 16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_inputs(dtype, seed):
    """Values and gradients in the input dtype within its tolerance (float16: FP16), the float32 results (state, du,
    d init_state) within float32's; three chunks, the last partial."""
    check(1, 80, 1, 16, "masks", dtype=dtype, n_state=1, seed=seed)


@pytest.mark.parametrize("with_init", [True, False], ids=["init_state", "no init_state"])
def test_loss_on_y_alone(with_init, seed):
    """The usual training call: a loss on y alone, so the backward gets no state cotangent (dstate None: the
    backward scan starts from nothing) and, without init_state, stores no d init_state; three chunks, the last
    partial."""
    check(2, 80, 1, 16, "masks", n_state=2 if with_init else None, with_dstate=False, seed=seed)


def test_custom_op_registration():
    """Schema, fake (meta) implementations and autograd registration of the custom op (torch.library.opcheck)."""
    B, T, H, N = 1, 3, 1, 16
    x = make_inputs(B, T, H, N, 3, decay="masks", n_state=B)
    args = [torch.tensor(x[n], device=DEVICE).view(B, T, H, N).requires_grad_(True) for n in "rkvw"]
    args += [torch.tensor(x["u"], device=DEVICE).requires_grad_(True),
             torch.tensor(x["init_state"], device=DEVICE).requires_grad_(True), Settings().key]
    torch.library.opcheck(binding.forward_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_protocol():
    assert engine.NAME == "triton" and engine.BACKEND == "torch"
    r = torch.zeros(1, 2, 1, 64)
    assert not engine.supports(r, 64), "CPU tensors never go to the Triton engine"
    assert engine.is_available() == CUDA


def test_jit_functions_take_no_default_arguments():
    """Every argument of a @triton.jit function is passed explicitly: Triton 3.6 (with torch 2.11, the GPU machines)
    fails to compile a call that leaves a default in place (a string constexpr default broke every kernel there
    while the interpreter and newer Triton ran it)."""
    import ast
    import pathlib

    folder = pathlib.Path(engine.__file__).parent
    files = sorted(folder.glob("*.py"))
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                if node.args.defaults or any(d is not None for d in node.args.kw_defaults):
                    offenders.append(f"{path.name}:{node.lineno} {node.name}")
    assert len(files) >= 5 and not offenders, offenders
