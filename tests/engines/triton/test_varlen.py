"""Packed sequences (cu_seqlens) on the Triton engine: packed equals the float64 oracle run on each sequence alone
(outputs, final states, every gradient: r, k, v, w, u, the start states, through the final states), fp32 and bf16,
for the portable engine's packings (empty and one-token sequences, boundaries inside and at chunk edges, T not a
multiple of the chunk), random ones, strong decays and masks, chunks of several sub-blocks, compiled with traced
offsets; and equals the engine's own fixed-length calls one sequence at a time.

Interpreted on CPU tensors (TRITON_INTERPRET=1) at tiny shapes; test_gpu_bf16 runs the compiled kernels (bfloat16
products on the tensor cores) where a CUDA device is.
"""
import numpy as np
import pytest
import torch

from rwkv6_keras_operator import RWKVKernelOperator
from rwkv6_keras_operator.autodiff import vjp
from rwkv6_keras_operator.engines import triton as engine
from rwkv6_keras_operator.engines import packed
from rwkv6_keras_operator.engines.triton import binding
from rwkv6_keras_operator.engines.triton.varlen import varlen_tables
from rwkv6_keras_operator.engines.triton.settings import Settings
from rwkv6_keras_operator.reference import wkv_reference_varlen, wkv_reference_varlen_grads
from tests.engines.portable.test_varlen import PACKINGS, check_packed, random_packing
from tests.helpers import FP32_GRAD, FP32_OUT, make_inputs, rel_err

pytestmark = pytest.mark.requires("triton")

H, N = 2, 16          # the smallest head size the engine takes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_call(settings=Settings()):
    """The engine's wkv_varlen with these launch settings, as check_packed calls it."""
    return lambda r, k, v, w, u, s0, cu: binding.wkv_varlen(r, k, v, w, u, s0, cu, settings)


def check(cu, dtype="float32", form="one per sequence", decay="masks", settings=Settings(), seed=None):
    check_packed(cu, dtype, form, decay, seed, fn=packed_call(settings), H=H, N=N)


@pytest.mark.parametrize("L", [16, 32])
def test_tables_equal_the_shared_chunk_table(L, rng):
    """varlen_tables (two launches) holds packed.chunk_table's values: the packings of the other tests, random ones
    with many empty sequences, and more sequences than a block of the kernels (2000 > 1024)."""
    cases = [np.array(cu, np.int32) for cu in PACKINGS + [list(range(13)), [0, 0, 1, 1], [0, 1]]]
    for n, T in ((7, 50), (40, 300), (2000, 3000)):
        cases.append(np.concatenate([[0], np.sort(rng.integers(0, T + 1, n - 1)), [T]]).astype(np.int32))
    for cu in cases:
        T, n = int(cu[-1]), len(cu) - 1
        want = packed.chunk_table(torch.tensor(cu, device=DEVICE), T, n, L)
        got = varlen_tables(torch.tensor(cu, device=DEVICE), T, L)
        assert np.array_equal(got.chunks.cpu().numpy(), want.packed.cpu().numpy()), cu
        lengths = np.diff(cu)
        chunks = -(-lengths // L)
        assert np.array_equal(got.sequences.cpu().numpy(), np.stack([np.cumsum(chunks) - chunks, chunks], 1)), cu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_equals_separate_sequences(dtype, seed):
    for cu in PACKINGS:
        check(cu, dtype, seed=seed)


@pytest.mark.parametrize("cu", [list(range(13)), [0, 0, 1, 1], [0, 1]], ids=["all one-token", "T = 1", "n = 1"])
def test_one_token_sequences(cu, seed):
    check(cu, seed=seed)


@pytest.mark.parametrize("form", ["none", "mapped"])
def test_start_state_forms(form, seed):
    check(PACKINGS[0], form=form, seed=seed)


@pytest.mark.parametrize("decay", ["strong", "masks"])
def test_random_packings(decay, rng):
    check(random_packing(rng), decay=decay, seed=int(rng.integers(2**31)))


@pytest.mark.parametrize("settings", [Settings(chunk=32, sub_block=16), Settings(chunk=16, sub_block=16)],
                         ids=["two sub-blocks a chunk", "chunks of 16"])
def test_chunk_geometries(settings, seed):
    """A chunk of two sub-blocks (the kernels carry the state over the sub-block before), and chunks of 16 (cuts at
    their edges, sequences over several chunks)."""
    for cu in PACKINGS[:2]:
        check(cu, settings=settings, seed=seed)


def test_equals_fixed_length_calls(rng):
    """The packed call and the engine's own wkv on each sequence alone, start states given: the same kernels' math,
    so the same outputs and final states to float32 rounding."""
    cu = np.array([0, 5, 37, 37, 70], np.int32)
    x = make_inputs(1, 70, H, N, int(rng.integers(2**31)), decay="masks", n_state=4)
    r, k, v, w = (torch.tensor(x[a].reshape(1, 70, H, N), device=DEVICE) for a in "rkvw")
    u, s0 = torch.tensor(x["u"], device=DEVICE), torch.tensor(x["init_state"], device=DEVICE)
    y, finals = engine.wkv_varlen(r, k, v, w, u, s0, torch.tensor(cu, device=DEVICE))
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if a == b:
            assert torch.equal(finals[i], s0[i])   # an empty sequence: its start state
            continue
        y_i, state_i = engine.wkv(r[:, a:b], k[:, a:b], v[:, a:b], w[:, a:b], u, s0[i:i + 1])
        assert rel_err(y[:, a:b].cpu().numpy(), y_i.cpu().numpy()) <= FP32_OUT
        assert rel_err(finals[i:i + 1].cpu().numpy(), state_i.cpu().numpy()) <= FP32_OUT


def test_compiled_with_traced_offsets():
    """torch.compile(fullgraph=True) with cu_seqlens a traced tensor: one trace serves two packings, forward and
    backward (the custom ops are opaque to the compiler; their fake implementations give the shapes)."""
    T = 45
    x = make_inputs(1, T, H, N, None, decay="masks", n_state=4)
    dy = np.random.default_rng().standard_normal((1, T, H * N)).astype(np.float32)

    def loss(r, k, v, w, u, s0, cu):
        y, finals = engine.wkv_varlen(r, k, v, w, u, s0, cu)
        return (y.reshape(1, T, H * N) * torch.tensor(dy, device=DEVICE)).sum() + finals.sum(), y, finals

    # inductor where a GPU is; on CPU aot_eager (inductor would build C++ for the ops around the engine's)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(loss, backend=backend, fullgraph=True, dynamic=False)
    for cu in (np.array([0, 7, 7, 40, 45], np.int32), np.array([0, 0, 32, 33, 45], np.int32)):
        leaves = [torch.tensor(x[a].reshape(1, T, H, N), device=DEVICE, requires_grad=True) for a in "rkvw"]
        leaves += [torch.tensor(x[a], device=DEVICE, requires_grad=True) for a in ("u", "init_state")]
        total, y, finals = compiled(*leaves, torch.tensor(cu, device=DEVICE))
        grads = torch.autograd.grad(total, leaves)
        y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, x["init_state"])
        g_ref = wkv_reference_varlen_grads(*(x[a] for a in "rkvwu"), N, cu, dy, np.ones_like(s_ref, np.float32),
                                           x["init_state"])
        assert rel_err(y.detach().cpu().numpy().reshape(1, T, H * N), y_ref) <= FP32_OUT
        assert rel_err(finals.detach().cpu().numpy(), s_ref) <= FP32_OUT
        for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
            want = g_ref[name].reshape(g.shape)
            assert rel_err(g.cpu().numpy(), want) <= FP32_GRAD, name


def test_operator_routes_packed_calls_here(gpu_engine, chosen_engines, rng):
    """op(..., cu_seqlens=...) runs this engine's wkv_varlen: start states shared through a state_map (their gradients
    summed by the operator's gather), against the oracle."""
    cu = np.array(PACKINGS[0], np.int32)
    T, n = int(cu[-1]), len(cu) - 1
    x = make_inputs(1, T, H, N, int(rng.integers(2**31)), decay="masks", n_state=3)
    state_map = rng.integers(0, 3, n).astype(np.int32)
    dy = rng.standard_normal((1, T, H * N)).astype(np.float32)
    dstate = rng.standard_normal((n, H, N, N)).astype(np.float32)
    op = RWKVKernelOperator(N)
    args = [torch.tensor(x[a], device=DEVICE) for a in ("r", "k", "v", "w", "u", "init_state")]

    def packed(r, k, v, w, u, s):
        return op(r, k, v, w, u, with_state=True, init_state=s, state_map=state_map, cu_seqlens=cu)

    (y, states), grads = vjp(packed, args, [dy, dstate])
    assert chosen_engines == ["triton"]
    y_ref, s_ref = wkv_reference_varlen(*(x[a] for a in "rkvwu"), N, cu, x["init_state"], state_map)
    g_ref = wkv_reference_varlen_grads(*(x[a] for a in "rkvwu"), N, cu, dy, dstate, x["init_state"], state_map)
    assert rel_err(y, y_ref) <= FP32_OUT and rel_err(states, s_ref) <= FP32_OUT
    for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
        assert rel_err(g, g_ref[name]) <= FP32_GRAD, name


@pytest.mark.requires("gpu")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_compiled(dtype, rng):
    """Compiled on the GPU at the models' head size (N = 64): a row of 40 random documents (enough sequences times
    heads for the scan's larger tiles), bfloat16 products on the tensor cores (bfloat16 inputs; chunk states stored
    in bfloat16) or float32-exact ones (tf32x3), against the oracle at the dtype's tolerance."""
    lengths = rng.integers(1, 200, 40)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    check_packed(cu, dtype, "one per sequence", "strong", int(rng.integers(2**31)), fn=packed_call(), H=4, N=64)
