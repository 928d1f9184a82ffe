"""launcher.CachedLaunch, the low host-time launch of the step kernel: which launches take the direct call to the
compiled kernel's launcher, with which arguments, and (on a CUDA GPU) that it gives exactly the results of Triton's
normal launch, also replayed from a CUDA graph.

On CPU the kernel runs under the Triton interpreter, where the launch must take the normal path throughout; the direct
call's logic is checked there with a stand-in kernel that records what it is called with.
"""
import pytest

from tests.helpers import FP32_OUT, make_inputs, rel_err

pytestmark = pytest.mark.requires("triton")

import torch  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator  # noqa: E402
from rwkv6_keras_operator.engines.triton import binding, launcher, pool, recurrent  # noqa: E402
from rwkv6_keras_operator.reference import wkv_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


class Hooks:
    def __init__(self, *calls):
        self.calls = list(calls)


class Runtime:
    """Stands in for triton.knobs.runtime."""

    def __init__(self):
        self.debug = False
        self.launch_enter_hook, self.launch_exit_hook = Hooks(), Hooks()


class Compiled:
    """Stands in for a compiled kernel: records the calls of its launcher."""

    def __init__(self):
        self.function, self.packed_metadata, self.calls = "function", "packed", []

    def run(self, *args):
        self.calls.append(args)


class Kernel:
    """Stands in for a @triton.jit function of 3 parameters: records the normal launches."""

    params = ("x", "n", "BLOCK")

    def __init__(self):
        self.compiled, self.launches = Compiled(), []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.launches.append((grid, args, options))
            return self.compiled
        return launch


def stand_in():
    kernel, runtime = Kernel(), Runtime()
    return kernel, runtime, launcher.CachedLaunch(kernel, stream=lambda device: 1000 + device, runtime=runtime)


def test_first_launch_of_a_key_is_normal_then_direct():
    kernel, _, launch = stand_in()
    launch((6,), "key", ("x", 3, 64), 0, num_warps=4)
    assert kernel.launches == [((6,), ("x", 3, 64), {"num_warps": 4})] and kernel.compiled.calls == []
    launch((7, 2), "key", ("x2", 3, 64), 0, num_warps=4)
    assert len(kernel.launches) == 1 and launch.fast_launches == 1
    # exactly the launcher call that ends Triton's JITFunction.run, on the device's current stream, no hooks
    assert kernel.compiled.calls == [(7, 2, 1, 1000, "function", "packed", None, None, None, "x2", 3, 64)]
    launch((6,), "other key", ("x", 4, 64), 0, num_warps=4)   # a new specialisation: the normal path again
    assert len(kernel.launches) == 2 and launch.fast_launches == 1


def test_normal_path_without_key_with_hooks_or_in_debug_mode():
    kernel, runtime, launch = stand_in()
    launch((1,), "key", ("x", 1, 16), 0)
    launch((1,), None, ("x", 1, 16), 0)                       # e.g. a pointer not 16-byte aligned
    runtime.launch_enter_hook.calls.append(print)             # a profiler's hook must see every launch
    launch((1,), "key", ("x", 1, 16), 0)
    runtime.launch_enter_hook.calls.clear()
    runtime.debug = True
    launch((1,), "key", ("x", 1, 16), 0)
    assert len(kernel.launches) == 4 and launch.fast_launches == 0
    runtime.debug = False
    launch((1,), "key", ("x", 1, 16), 0)
    assert launch.fast_launches == 1


def test_a_compiled_kernel_that_looks_different_turns_the_direct_call_off():
    kernel, _, launch = stand_in()
    del kernel.compiled.packed_metadata
    with pytest.warns(UserWarning, match="normal path"):
        launch((1,), "key", ("x", 1, 16), 0)
    launch((1,), "key", ("x", 1, 16), 0)
    assert len(kernel.launches) == 2 and launch.fast_launches == 0 and launch.enabled is False


def test_alignment():
    x = torch.zeros(64)
    assert launcher.aligned(x, None, x[4:]) and not launcher.aligned(x, x[1:])


def test_versions_and_interpreter():
    """The direct call is on for the Triton versions whose launch convention was read (their JITFunction.run ends with
    the call it repeats), and never for a kernel the interpreter runs."""
    supported = launcher.SUPPORTED[0] <= launcher._version() <= launcher.SUPPORTED[1]
    if supported:
        assert launcher._run_launches_as_read()
    fresh = launcher.CachedLaunch(recurrent.step_kernel)
    fresh._enable()
    if not CUDA:
        assert not launcher._is_compiled_jit(recurrent.step_kernel) and fresh.enabled is False
    else:
        assert fresh.enabled == supported


@pytest.mark.requires("gpu")
@pytest.mark.parametrize("start", ["none", "rows", "shared", "pool"])
def test_direct_launch_equals_the_normal_launch(monkeypatch, start):
    """On a CUDA GPU, the real step kernel: a second launch with the same specialisation takes the direct call and
    gives bit for bit what Triton's normal launch gives (the normal path: a CachedLaunch kept off)."""
    B, H, N, n = 5, 4, 64, 9
    x = make_inputs(B, 1, H, N, 21, decay="masks", n_state=n)
    args = [torch.tensor(x[c], device="cuda") for c in "rkvw"] + [torch.tensor(x["u"], device="cuda")]
    states = torch.tensor(x["init_state"], device="cuda")
    slots = torch.tensor([8, 0, 3, 5, 1], device="cuda")

    def once():
        if start == "pool":
            pooled = states.clone()
            y, _ = pool.pool_step(*(a[:, 0] for a in args[:4]), args[4], pooled, slots)
            return y, pooled
        s0 = {"none": None, "rows": states[:B], "shared": states[:1].expand(B, H, N, N)}[start]
        with torch.no_grad():
            return binding.decode(*args, s0)

    direct = launcher.CachedLaunch(recurrent.step_kernel)
    monkeypatch.setattr(recurrent, "LAUNCH", direct)
    first = once()
    second = once()
    assert direct.enabled and direct.fast_launches == 1 and len(direct.kernels) == 1
    normal = launcher.CachedLaunch(recurrent.step_kernel)
    normal.enabled = False
    monkeypatch.setattr(recurrent, "LAUNCH", normal)
    reference = once()
    for a, b, c in zip(first, second, reference):
        assert torch.equal(a, b) and torch.equal(b, c)
    if start == "rows":
        y_ref, s_ref = wkv_reference(*(x[c] for c in "rkvwu"), N, x["init_state"][:B])
        assert rel_err(second[0].cpu().numpy(), y_ref) <= FP32_OUT
        assert rel_err(second[1].cpu().numpy(), s_ref) <= FP32_OUT


@pytest.mark.requires("gpu")
def test_direct_launch_in_a_cuda_graph():
    """op(...) decode captured in a CUDA graph after a warm-up (the capture takes the direct call, on the capturing
    stream): each replay gives what an eager call gives."""
    B, H, N = 3, 2, 64
    x = make_inputs(B, 1, H, N, 22, decay="strong", n_state=B)
    static = [torch.tensor(x[c], device="cuda") for c in "rkvw"]
    u, s0 = torch.tensor(x["u"], device="cuda"), torch.tensor(x["init_state"], device="cuda")
    op = RWKVKernelOperator(N)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            op(*static, u, with_state=True, init_state=s0)
        torch.cuda.current_stream().wait_stream(stream)
        before = recurrent.LAUNCH.fast_launches
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, state = op(*static, u, with_state=True, init_state=s0)
        assert recurrent.LAUNCH.fast_launches == before + 1
        for seed in (23, 24):
            fresh = make_inputs(B, 1, H, N, seed, decay="masks")
            for a, c in zip(static, "rkvw"):
                a.copy_(torch.tensor(fresh[c]))
            graph.replay()
            y_want, state_want = op(*static, u, with_state=True, init_state=s0)
            torch.testing.assert_close(y, y_want, rtol=0, atol=0)
            torch.testing.assert_close(state, state_want, rtol=0, atol=0)
            y_ref, s_ref = wkv_reference(*(fresh[c] for c in "rkvw"), x["u"], N, x["init_state"])
            assert rel_err(y.cpu().numpy(), y_ref) <= FP32_OUT and rel_err(state.cpu().numpy(), s_ref) <= FP32_OUT
