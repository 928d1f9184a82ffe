"""The Pallas kernels as Triton IR, and compiled for Hopper, on a machine without a GPU.

jax lowers a pallas_call for the "cuda" platform to Triton IR in Python (the compile to PTX happens later, inside
XLA on the GPU), so the lowering can run anywhere. This helper captures the IR of every kernel of one engine
configuration; `compile_report` then compiles it with the `triton` package (if installed) for sm_90a and reads
shared memory, registers and spills. Used by test_lowering.py and, as a script, to survey configurations:

    python tests/engines/pallas/triton_ir.py 64 bfloat16 32 [more "N dtype chunk" triples]
"""
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from rwkv6_keras_operator.engines.pallas import core, vjp


def capture(N, dtype, chunk, low_precision="tf32", T=256, B=2, H=2):
    """{kernel name: Triton IR text} for the forward, backward and decode kernels of one configuration."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = {}

    def capturing(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules.setdefault(jaxpr.debug_info.func_name, result.module.operation.get_asm(enable_debug_info=False))
        return result

    saved = core.interpret
    registration.lowering.lower_jaxpr_to_triton_module = capturing
    core.interpret = lambda: False
    try:
        x = jnp.zeros((B, T, H, N), dtype)
        u, s0 = jnp.zeros((H, N), jnp.float32), jnp.zeros((B, H, N, N), jnp.float32)

        def f(r, k, v, w, u, s0):
            return vjp.wkv(r, k, v, w, u, s0, chunk=chunk, low_precision=low_precision)

        def loss(*a):
            y, s = f(*a)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

        for fn, args in ((jax.grad(loss, argnums=tuple(range(6))), (x, x, x, x, u, s0)),
                         (f, (x[:, :1],) * 4 + (u, s0))):
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        core.interpret = saved
    return modules


WARPS = {"wkv6_state_terms": ("terms_warps", 2), "wkv6_output": ("output_warps", 2),
         "wkv6_grads": ("grads_warps", 1), "wkv6_scan": ("scan_warps", 3), "wkv6_recurrent": (None, 2)}


def compile_report(name, ir, num_warps=None, num_stages=None):
    """Compile one kernel's IR with the triton package for sm_90a: shared memory, and with cuobjdump (shipped
    with triton) registers, stack (spills) and the matrix instructions in the SASS."""
    import triton
    from triton.backends.compiler import GPUTarget

    key, stages = WARPS.get(name, (None, 2))
    num_warps = num_warps or (core.TUNING[key] if key else 2)
    num_stages = num_stages or stages
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.ttir")
        with open(path, "w") as f:
            f.write(ir)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        report = {"kernel": name, "warps": num_warps, "stages": num_stages, "smem": kernel.metadata.shared}
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        cuobjdump = os.path.join(tools, "cuobjdump")
        if os.path.exists(cuobjdump):
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            if found:
                report["registers"], report["stack"] = int(found.group(1)), int(found.group(2))
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
            report["mma"] = len(re.findall(r"\bH(G)?MMA\b", sass))
            report["sass_lines"] = sass.count("\n")
    return report


if __name__ == "__main__":
    args = sys.argv[1:] or ["64", "bfloat16", "32"]
    for i in range(0, len(args), 3):
        N, dtype, chunk = int(args[i]), args[i + 1], int(args[i + 2])
        for name, ir in capture(N, dtype, chunk).items():
            try:
                print(N, dtype, chunk, compile_report(name, ir), flush=True)
            except Exception as e:  # noqa: BLE001
                print(N, dtype, chunk, name, "FAILED", repr(e)[:500], flush=True)
