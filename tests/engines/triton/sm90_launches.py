"""What tests/engines/triton/test_sm90.py runs in a process of its own: every launch the Triton engine makes, compiled
for Hopper (sm_90) on a machine without a GPU.

The interpreter runs a kernel's Python, not its compilation, so a kernel that does not compile (a type or layout
error in a constexpr branch, a shared-memory need past the card's) would pass every CPU test and fail on the first GPU
call. Here the engine's host code runs as on a GPU (the compiled kernels' precisions, every launch setting the rules
pick), but `JITFunction.run` only records each launch: its kernel, arguments and options. Each distinct launch is then
compiled as Triton would for it (its own specialisation of every argument) with the triton package's bundled ptxas.

    python -m tests.engines.triton.sm90_launches OUT.json

writes one record a distinct launch: the kernel, what made it distinct, and its registers, stack bytes and shared
memory, or the compiler's error. No kernel runs (the outputs are uninitialised), so no value is read back. Any
triton on the path is the compiler checked: the GPU machines' own version (3.6) can be put first on PYTHONPATH
(`pip install --target DIR triton==3.6.0`).
"""
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)   # compiled JITFunctions, not the interpreter's
os.environ["KERAS_BACKEND"] = "torch"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from rwkv6_keras_operator.engines import shared  # noqa: E402
from rwkv6_keras_operator.engines.triton import binding, pool, recurrent  # noqa: E402
from rwkv6_keras_operator.engines.triton.settings import Settings  # noqa: E402
from tests.helpers import load_script  # noqa: E402

REPORT = load_script("benchmarks/triton_compile_report.py")   # its resources(cubin): registers and stack bytes
TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def record_launches():
    """Replace JITFunction.run by a recorder: [(fn, {parameter: value}, {option: value})] in launch order."""
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args))
        values.update((name, value) for name, value in kwargs.items() if name in self.arg_names)
        options = {name: value for name, value in kwargs.items() if name in OPTIONS and value is not None}
        launches.append((self, values, options))

    JITFunction.run = run
    return launches


def gpu_precisions(x):
    """The compiled kernels' precisions (binding.precisions gives the interpreter's to CPU tensors)."""
    return shared.precisions(str(x.dtype).replace("torch.", ""))


def specialised(fn, values):
    """(signature, constexprs, attrs) of fn's compilation for these argument values, as Triton's launch makes them:
    constexprs as given, None for an absent tensor, an int 1 as a constant, pointers and ints divisible by 16 marked."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def distinct(launches):
    """The launches that compile to different kernels, each once: [(fn, signature, constexprs, attrs, options)]."""
    seen = {}
    for fn, values, options in launches:
        signature, constexprs, attrs = specialised(fn, values)
        key = (fn.__name__, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
               repr(sorted(attrs)), repr(sorted(options.items())))
        seen.setdefault(key, (fn, signature, constexprs, attrs, options))
    return list(seen.values())


def inputs(B, T, H, N, dtype):
    make = lambda: torch.randn(B, T, H, N).to(DTYPES[dtype])  # noqa: E731
    return make(), make(), make(), make(), torch.randn(H, N)


def chunked_calls(B, T, H, N, dtype, settings, with_s0=True):
    """The forward and the backward of a fixed-length call (what autograd runs), with a start state or none."""
    r, k, v, w, u = inputs(B, T, H, N, dtype)
    s0 = torch.randn(B, H, N, N) if with_s0 else None
    y, state, states = binding.forward_impl(r, k, v, w, u, s0, settings)
    binding.backward_impl(r, k, v, w, u, s0, states, torch.randn_like(y), torch.randn_like(state), settings)


def packed_calls(T, H, N, dtype, settings, cu, with_s0=True):
    """The forward and the backward of packed sequences (cu_seqlens)."""
    r, k, v, w, u = inputs(1, T, H, N, dtype)
    n = len(cu) - 1
    s0 = torch.randn(n, H, N, N) if with_s0 else None
    y, finals, states, chunks, sequences = binding.forward_varlen_impl(r, k, v, w, u, s0,
                                                                       torch.tensor(cu, dtype=torch.int32), settings)
    binding.backward_varlen_impl(r, k, v, w, u, chunks, sequences, states, torch.randn_like(y),
                                 torch.randn_like(finals), with_s0, settings)


def step_calls(B, H, N, dtype):
    """The decode step (with a start state and without) and the pool step."""
    r, k, v, w, u = (x.reshape(B, 1, H * N) if x.ndim == 4 else x for x in inputs(B, 1, H, N, dtype))
    recurrent.step(r, k, v, w, u, torch.randn(B, H, N, N))
    recurrent.step(r, k, v, w, u, None)
    pool.pool_step_impl(r, k, v, w, u, torch.randn(2 * B, H, N, N), torch.arange(B, dtype=torch.int64) * 2)


def capture():
    """Every kind of launch the operator's calls make on a GPU: each dtype with a start state, fixed length and
    packed, and the decode and pool steps; then in bfloat16: no start state, the other head sizes, both scan regimes
    (few rows x heads: tiles of 16 keys; many: 32; segments with their combine and fix-up kernels), chunks of two
    sub-blocks, the split backward, the masks from the level table."""
    binding.precisions = gpu_precisions
    launches = record_launches()
    default, split = Settings(), Settings(backward_split=True)
    for dtype in DTYPES:
        chunked_calls(1, 100, 2, 64, dtype, default)
        packed_calls(100, 2, 64, dtype, default, [0, 5, 5, 40, 100])
        step_calls(3, 2, 64, dtype)
    chunked_calls(1, 100, 2, 64, "bfloat16", default, with_s0=False)
    packed_calls(100, 2, 64, "bfloat16", default, [0, 37, 100], with_s0=False)
    chunked_calls(4, 64, 32, 64, "bfloat16", default)                          # many rows x heads
    chunked_calls(1, 200, 2, 64, "bfloat16", Settings(segments=3))             # segmented scans
    chunked_calls(1, 200, 2, 64, "bfloat16", Settings(chunk=64, sub_block=32))  # two sub-blocks a chunk
    for N in (16, 32, 128):
        chunked_calls(1, 100, 128 // N, N, "bfloat16", default)
        step_calls(3, 128 // N, N, "bfloat16")
    for N in (64, 128):
        chunked_calls(1, 100, 2, N, "bfloat16", split)
    packed_calls(100, 2, 64, "bfloat16", split, [0, 5, 5, 40, 100])
    for dtype in ("float32", "bfloat16"):                                       # the masks from the level table
        chunked_calls(1, 100, 2, 64, dtype, Settings(mask_table=True))
    chunked_calls(1, 100, 2, 64, "bfloat16", Settings(mask_table=True, backward_split=True))
    return launches


def defined_kernels():
    """The names of the engine's kernels: its modules' @triton.jit functions named *_kernel (helpers are not)."""
    import importlib
    import pkgutil

    from rwkv6_keras_operator.engines import triton as engine

    names = set()
    for module in pkgutil.iter_modules(engine.__path__):
        for name, value in vars(importlib.import_module(f"{engine.__name__}.{module.name}")).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return sorted(names)


def compile_one(fn, signature, constexprs, attrs, options):
    record = {"kernel": fn.__name__, "options": options,
              "constexprs": {k: v for k, v in constexprs.items() if isinstance(v, (int, float, str, type(None)))}}
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                                options=options)
        record["registers"], record["stack"] = REPORT.resources(kernel.asm["cubin"])
        record["shared"] = kernel.metadata.shared
    except Exception:   # the test reports every failure with its launch
        record["error"] = traceback.format_exc(limit=3)[-3000:]
    return record


def _compile_at(i):
    return compile_one(*KERNELS[i])


KERNELS = []


def main(out):
    import multiprocessing

    launches = capture()
    KERNELS.extend(distinct(launches))
    # forked workers inherit the kernels; each compiles its share
    with multiprocessing.get_context("fork").Pool(max(1, min(os.cpu_count() or 1, 8))) as workers:
        records = workers.map(_compile_at, range(len(KERNELS)), chunksize=1)
    with open(out, "w") as f:
        json.dump({"triton": triton.__version__, "defined": defined_kernels(), "launches": len(launches),
                   "records": records}, f)


if __name__ == "__main__":
    main(sys.argv[1])
