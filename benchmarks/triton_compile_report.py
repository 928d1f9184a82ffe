"""The Triton engine's chunk kernels compiled for Hopper (sm_90) on a machine without a GPU: registers, stack
(spills), MMA instructions and SASS lines per launch setting. A proxy, not a timing. With the GPU machines' own
triton (3.6: `pip install triton==3.6.0` in a venv with the CPU torch) the SASS is exactly the GPU's, since triton
bundles its ptxas; with another version it may differ (benchmarks/notes_triton.md).

    KERAS_BACKEND=torch python benchmarks/triton_compile_report.py            # N = 64, bf16, the default chunk
    CHUNKS=32/32,64/32 WARPS=4,8 N=64 DTYPE=bfloat16 MAXNREG=128 python benchmarks/triton_compile_report.py
    LINES=20 WARPS=4 python benchmarks/triton_compile_report.py               # + instructions a warp executes, by line
    VARLEN=1 python benchmarks/triton_compile_report.py                       # the kernels of packed sequences
    MASK_TABLE=1 python benchmarks/triton_compile_report.py                   # Settings.mask_table
    KERNELS=backward,backward_rows,backward_keys python benchmarks/triton_compile_report.py   # some kernels only

Kernels (KERNELS, default all): forward, backward (the fused backward), backward_rows and backward_keys (the split
backward of Settings.backward_split, backward_split.py).

LINES=K also counts the instructions a warp executes (a loop's body times its trip count: the backward kernel's
one loop is the level loop, LOG_C - 1 trips, when L == C) and lists the K source lines that execute the most
(`nvdisasm -gi` maps each instruction to the line of the kernel source it came from).
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

from rwkv6_keras_operator.engines.triton import backward, backward_split, forward  # noqa: E402
from rwkv6_keras_operator.engines.shared import precisions  # noqa: E402
from rwkv6_keras_operator.engines.triton.common import precision_args  # noqa: E402
from rwkv6_keras_operator.engines.triton.settings import Settings  # noqa: E402

TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SPECIALIZED = ("T", "H", "stride_t")   # the runtime sees them divisible by 16 at the benchmark shapes


def compile_report(fn, dtype, constexprs, warps, stages, maxnreg=None):
    """(registers, stack bytes, MMA instructions, SASS lines, cubin) of fn compiled for sm_90; constexprs that fn
    does not take are left out. A pointer given as None among the constexprs is an absent tensor, as a launch passes
    it (s0_ptr without a start state)."""
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            fp32 = name in ("u_ptr", "s0_ptr", "du_ptr", "dg_ptr") or (name in ("states_ptr", "dstates_ptr") and
                                                             dtype != "bfloat16")   # Precisions.states_dtype
            signature[name] = "*" + ("i32" if name in ("chunks_ptr", "sequences_ptr") else
                                     "bf16" if name == "levels_ptr" else "fp32" if fp32 else TYPES[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in SPECIALIZED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages,
                                                                        **({"maxnreg": maxnreg} if maxnreg else {})})
    cubin = kernel.asm["cubin"]
    sass = _cuobjdump(cubin, "-sass")
    return (*resources(cubin), sass.count("HMMA"), sass.count("\n"), cubin)


def _cuobjdump(cubin, flag):
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(tools, "cuobjdump"), flag, f.name], capture_output=True, text=True).stdout


def resources(cubin):
    """(registers a thread, stack bytes a thread) of a compiled kernel, by the cuobjdump bundled with triton."""
    usage = _cuobjdump(cubin, "-res-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def executed_by_line(cubin, trips):
    """(instructions a warp executes, {(file, line): count}): instructions inside a loop (between a backward branch
    and its target) count `trips` times, all others once."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([os.path.join(tools, "nvdisasm"), "-gi", "-c", f.name],
                                 capture_output=True, text=True).stdout
    code, labels, pending, where = [], {}, [], None
    for text in listing.splitlines():
        loc = re.search(r'//## File "([^"]+)", line (\d+)', text)
        label = re.match(r"(\.L_x_\d+):", text)
        if loc:
            if "inlined at" not in text:      # the innermost source line, not the call sites above it
                where = (os.path.basename(loc.group(1)), int(loc.group(2)))
        elif label:
            pending.append(label.group(1))    # a branch target: the address of the next instruction
        else:
            ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*)", text)
            if ins:
                addr = int(ins.group(1), 16)
                labels.update((name, addr) for name in pending)
                pending = []
                target = re.search(r"\.L_x_\d+", ins.group(3)) if ins.group(2) == "BRA" else None
                code.append((addr, target.group(0) if target else None, where))
    loops = [(labels[target], addr) for addr, target, _ in code if target and labels.get(target, addr + 1) < addr]
    counts = {}
    for addr, _, line in code:
        n = trips if any(lo <= addr <= hi for lo, hi in loops) else 1
        counts[line] = counts.get(line, 0) + n
    return sum(counts.values()), counts


def print_lines(cubin, trips, top):
    total, counts = executed_by_line(cubin, trips)
    print(f"    {total} instructions a warp executes; the {top} lines that execute the most:")
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "rwkv6_keras_operator", "engines", "triton")
    for (name, line), n in sorted(((k, v) for k, v in counts.items() if k), key=lambda kv: -kv[1])[:top]:
        path = os.path.join(source, name)
        text = open(path).read().splitlines()[line - 1].strip() if os.path.exists(path) else ""
        print(f"    {n:6d} {100 * n / total:5.1f}%  {name}:{line}  {text[:80]}")


def main():
    N = int(os.environ.get("N", "64"))
    dtype = os.environ.get("DTYPE", "bfloat16")
    chunks = [tuple(map(int, c.split("/"))) for c in os.environ.get(
        "CHUNKS", f"{Settings().chunk}/{Settings().sub_block}").split(",")]
    warps_list = [int(w) for w in os.environ.get("WARPS", "4,8").split(",")]
    maxnreg = int(os.environ["MAXNREG"]) if os.environ.get("MAXNREG") else None
    top = int(os.environ.get("LINES", "0"))
    varlen = os.environ.get("VARLEN", "0") == "1"   # the kernels of packed sequences (chunks from the chunk table)
    table = os.environ.get("MASK_TABLE", "0") == "1"   # Settings.mask_table: the levels' masks from the level table
    kernels = {"forward": (forward.forward_kernel, {"BV": N}, 2), "backward": (backward.backward_kernel, {}, 1),
               "backward_rows": (backward_split.backward_rows_kernel, {}, 1),
               "backward_keys": (backward_split.backward_keys_kernel, {}, 1)}
    names = os.environ.get("KERNELS", ",".join(kernels)).split(",")
    p = precision_args(precisions(dtype))
    print(f"N={N} {dtype} precisions {p}; triton {triton.__version__}, sm_90")
    for L, C in chunks:
        # as the benchmark's calls: no start state, several chunks (the stored chunk states)
        common = dict(N=N, L=L, C=C, LOG_C=C.bit_length() - 1, **p, HAS_S0=False, s0_ptr=None, HAS_STATES=True,
                      VARLEN=varlen, MASK_TABLE=table, **({} if varlen else {"chunks_ptr": None}),
                      **({} if table else {"levels_ptr": None}))
        for warps in warps_list:
            for name in names:
                fn, extra, stages = kernels[name]
                regs, stack, mma, lines, cubin = compile_report(fn, dtype, {**common, **extra}, warps, stages,
                                                                maxnreg)
                print(f"{name:13s} L={L:<4d} C={C:<3d} warps {warps}: {regs} registers, {stack} B stack, "
                      f"{mma} MMA, {lines} SASS lines", flush=True)
                if top:
                    print_lines(cubin, C.bit_length() - 2, top)


if __name__ == "__main__":
    main()
