"""The Triton engine's chunk kernels compiled for Hopper (sm_90) on a machine without a GPU: registers, stack
(spills), MMA instructions and SASS lines per launch setting. A proxy, not a timing: the local triton may differ
from the GPU machine's (benchmarks/notes_triton.md compares both), but spills and register counts move together.

    KERAS_BACKEND=torch python benchmarks/triton_compile_report.py            # N = 64, bf16, the default chunk
    CHUNKS=32/32,64/32 WARPS=4,8 N=64 DTYPE=bfloat16 MAXNREG=128 python benchmarks/triton_compile_report.py
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")   # keras' default backend would load tensorflow next to triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rwkv6_keras_operator.engines.triton import backward, binding, forward  # noqa: E402
from rwkv6_keras_operator.engines.triton.common import precisions  # noqa: E402

TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SPECIALIZED = ("T", "H", "stride_t")   # the runtime sees them divisible by 16 at the benchmark shapes


def compile_report(fn, dtype, constexprs, warps, stages, maxnreg=None):
    """(registers, stack bytes, MMA instructions, SASS lines) of fn compiled for sm_90."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            fp32 = name in ("u_ptr", "s0_ptr", "du_ptr") or (name in ("states_ptr", "dstates_ptr") and
                                                             dtype != "bfloat16")   # binding.states_dtype
            signature[name] = "*" + ("fp32" if fp32 else TYPES[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in SPECIALIZED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages,
                                                                        **({"maxnreg": maxnreg} if maxnreg else {})})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return (int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)),
            sass.count("HMMA"), sass.count("\n"))


def main():
    N = int(os.environ.get("N", "64"))
    dtype = os.environ.get("DTYPE", "bfloat16")
    chunks = [tuple(map(int, c.split("/"))) for c in os.environ.get(
        "CHUNKS", f"{binding.CHUNK}/{binding.SUB}").split(",")]
    warps_list = [int(w) for w in os.environ.get("WARPS", "4,8").split(",")]
    maxnreg = int(os.environ["MAXNREG"]) if os.environ.get("MAXNREG") else None
    p = precisions(dtype)._asdict()
    print(f"N={N} {dtype} precisions {p}; triton {triton.__version__}, sm_90")
    for L, C in chunks:
        common = dict(N=N, L=L, C=C, LOG_C=C.bit_length() - 1, **p)
        for warps in warps_list:
            for name, fn, extra, stages in (("forward", forward.forward_kernel, {"BV": N}, 2),
                                            ("backward", backward.backward_kernel, {}, 1)):
                regs, stack, mma, lines = compile_report(fn, dtype, {**common, **extra}, warps, stages, maxnreg)
                print(f"{name:9s} L={L:<4d} C={C:<3d} warps {warps}: {regs} registers, {stack} B stack, "
                      f"{mma} MMA, {lines} SASS lines", flush=True)


if __name__ == "__main__":
    main()
