"""What every test module shares: which backend and engines can run here, a reproducible seed, and the GPU engine of
the active backend made selectable on a machine without a GPU.

Markers
    requires(*needs): skip unless every need is met here. A need is a Keras backend ("jax", "torch",
        "tensorflow"), an engine ("pallas", "triton": the engine's kernels can run here, compiled on a CUDA GPU or
        in their interpreter) or "gpu" (the active backend has a CUDA device). On a test it skips that test; as a
        module's `pytestmark` it skips the module before it is imported (a module may import its engine's
        internals: importing triton where tensorflow is loaded aborts the process).

Fixtures
    seed, rng: an int and a NumPy Generator seeded from it, different for each test and reproducible: the run's
        seed is `--seed N` (default: fresh), printed at the end of the run and in every failure report with the
        test's own seed.
    gpu_engine: the active backend's GPU engine (its module), selectable by the operator on this machine (see
        the fixture), or None where the backend has none that can run here.
    chosen_engines: the NAME of every engine `engines.select` picks while the test runs, in call order.
"""
import ast
import functools
import importlib.util
import os
import secrets
import zlib

import numpy as np
import pytest

from tests.helpers import BACKEND

BACKENDS = ("jax", "torch", "tensorflow")
_SEED = pytest.StashKey[int]()


# ------------------------------------------------------------------------------------------------- requirements
@functools.cache
def _pallas():
    if BACKEND != "jax":
        return f"the Pallas engine runs under the jax backend (KERAS_BACKEND={BACKEND})"
    try:
        import jax.experimental.pallas.triton  # noqa: F401
    except ImportError as error:
        return f"this jax has no Pallas Triton backend ({error})"
    return None


@functools.cache
def _triton():
    if BACKEND != "torch":
        return f"the Triton engine runs under the torch backend (KERAS_BACKEND={BACKEND})"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device: run with TRITON_INTERPRET=1 to check the Triton kernels on CPU"
    return None


@functools.cache
def _gpu():
    if BACKEND == "jax":
        import jax

        found = jax.default_backend() == "gpu"
    elif BACKEND == "torch":
        import torch

        found = torch.cuda.is_available()
    else:
        found = False   # the suite runs tensorflow on CPU only (its one engine is the portable one)
    return None if found else f"no CUDA device for the {BACKEND} backend"


def unmet(need):
    """None if `need` is met here, else why not."""
    if need in BACKENDS:
        return None if BACKEND == need else f"runs under the {need} backend (KERAS_BACKEND={BACKEND})"
    checks = {"pallas": _pallas, "triton": _triton, "gpu": _gpu}
    if need not in checks:
        raise ValueError(f"unknown requirement {need!r}: one of {BACKENDS + tuple(checks)}")
    return checks[need]()


def _why_not(needs):
    return next((reason for reason in map(unmet, needs) if reason), None)


def _module_needs(path):
    """The needs of a module's `pytestmark = pytest.mark.requires(...)` (also inside a list), read from its source:
    the module is not imported."""
    needs = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            for call in ast.walk(node.value):
                if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("mark.requires"):
                    needs += [ast.literal_eval(arg) for arg in call.args]
    return needs


class _SkippedModule(pytest.Module):
    """A module whose requirements are not met: reported as skipped, never imported."""

    reason = ""

    def collect(self):
        pytest.skip(self.reason)


def pytest_pycollect_makemodule(module_path, parent):
    reason = _why_not(_module_needs(module_path))
    if reason is None:
        return None
    module = _SkippedModule.from_parent(parent, path=module_path)
    module.reason = f"{module_path.relative_to(parent.config.rootpath)}: {reason}"
    return module


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _why_not([need for mark in item.iter_markers("requires") for need in mark.args])
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# --------------------------------------------------------------------------------------------------------- seeds
def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help="seed of the random test inputs (default: a fresh one, printed at the end of the run)")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*needs): skip unless each need ('jax', 'torch', 'tensorflow', "
                                       "'pallas', 'triton', 'gpu') is met here (see tests/conftest.py)")
    seed = config.getoption("--seed")
    if seed is None:   # an xdist worker takes the seed of the run; elsewhere a fresh one
        seed = getattr(config, "workerinput", {}).get("rwkv6_seed", secrets.randbelow(2**32))
    config.stash[_SEED] = seed


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: every worker uses the run's seed."""
    node.workerinput["rwkv6_seed"] = node.config.stash[_SEED]


def pytest_report_header(config):
    return f"random inputs: --seed {config.stash[_SEED]}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"random inputs of this run: --seed {config.stash[_SEED]} (rerun with it to replay)")


@pytest.fixture
def seed(request):
    """This test's seed: from the run's seed and the test's id, so that each test draws its own inputs and rerunning
    with the same --seed draws them again."""
    run_seed = request.config.stash[_SEED]
    value = zlib.crc32(f"{run_seed}:{request.node.nodeid}".encode())
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and "seed" in getattr(item, "funcargs", {}):
        report.sections.append(("random inputs", f"rerun with --seed {item.config.stash[_SEED]} to replay "
                                                 f"(this test's seed: {item.funcargs['seed']})"))


# --------------------------------------------------------------------------------------------------------- engines
class _AsIfOnCuda:
    """What the Triton engine's `supports` reads of a tensor (dtype, shape), with the tensor said to be on CUDA."""

    is_cuda = True

    def __init__(self, tensor):
        self.dtype, self.shape = tensor.dtype, tensor.shape


@pytest.fixture
def gpu_engine(monkeypatch):
    """The active backend's GPU engine, which the operator then selects for the inputs it takes (head size, dtype),
    here: under jax the Pallas engine in its interpreter on the CPU (also where a GPU is: the compiled kernels are
    the GPU tests' subject, and float32 products there would follow jax's TF32 default); under torch the Triton
    engine, on a CUDA device, or (TRITON_INTERPRET=1, no device) in the interpreter on CPU tensors, which its
    `supports` is told are on CUDA. None under tensorflow, or where the engine cannot run (see `unmet`)."""
    from rwkv6_keras_operator import engines

    monkeypatch.setattr(engines, "_CHOSEN", {})   # the operator's engine choices, made afresh for what this allows
    if BACKEND == "jax" and unmet("pallas") is None:
        import jax

        from rwkv6_keras_operator.engines import pallas
        from rwkv6_keras_operator.engines.pallas import common

        monkeypatch.setattr(common, "FORCE_INTERPRET", True)
        with jax.default_device(jax.devices("cpu")[0]):
            yield pallas
    elif BACKEND == "torch" and unmet("triton") is None:
        import torch

        from rwkv6_keras_operator.engines import triton

        if not torch.cuda.is_available():
            supports = triton.supports
            monkeypatch.setattr(triton, "is_available", lambda: True)
            monkeypatch.setattr(triton, "supports", lambda r, head_size: supports(_AsIfOnCuda(r), head_size))
        yield triton
    else:
        yield None


@pytest.fixture
def chosen_engines(monkeypatch):
    from rwkv6_keras_operator import engines

    names, select = [], engines.select

    def recording(*args, **kwargs):
        engine = select(*args, **kwargs)
        names.append(engine.NAME)
        return engine

    monkeypatch.setattr(engines, "select", recording)
    return names
