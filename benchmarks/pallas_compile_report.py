"""The Pallas engine's kernels as Triton IR, and compiled for Hopper, on a machine without a GPU.

jax lowers a pallas_call for the "cuda" platform to Triton IR in Python (the compile to PTX happens later, inside
XLA on the GPU), so the lowering can run anywhere. `capture` collects the IR of every kernel of one engine
configuration; `compile_reports` compiles it with the `triton` package for sm_90a, in a separate process (triton
and jaxlib each bring their own MLIR libraries, and loading both into one process can abort it), and reads shared
memory, and (with the cuobjdump that triton ships) registers, spills and matrix instructions. Used by
tests/engines/pallas/test_lowering.py and, as a script, to survey configurations (the Triton engine's counterpart
is triton_compile_report.py):

    python benchmarks/pallas_compile_report.py 64 bfloat16 32 [more "N dtype chunk" triples]
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

# kernel: (its Settings field for num_warps, None for the step kernel's StepSettings; num_stages), as the launchers
# use them
LAUNCH = {"wkv6_state_terms": ("state_terms_warps", 2), "wkv6_state_scan": ("state_scan_warps", 2),
          "wkv6_forward": ("forward_warps", 2), "wkv6_backward": ("backward_warps", 1),
          "wkv6_scan": ("scan_terms_warps", 3), "wkv6_recurrent": (None, 2)}


def capture(N, dtype, chunk, low_precision="tf32", T=256, B=2, H=2, varlen=False, **settings):
    """{kernel name: Triton IR text} for the forward, backward and decode kernels of one configuration (settings:
    other fields of the engine's Settings). varlen: the kernels of packed sequences instead (binding.wkv_varlen, one
    row of T tokens holding B sequences), without the decode kernel."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as registration

    from rwkv6_keras_operator.engines.pallas import binding, common
    from rwkv6_keras_operator.engines.pallas.settings import Settings

    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = {}

    def capturing(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules.setdefault(jaxpr.debug_info.func_name, result.module.operation.get_asm(enable_debug_info=False))
        return result

    saved = common.interpret
    registration.lowering.lower_jaxpr_to_triton_module = capturing
    common.interpret = lambda: False
    try:
        x = jnp.zeros((1 if varlen else B, T, H, N), dtype)
        u, s0 = jnp.zeros((H, N), jnp.float32), jnp.zeros((B, H, N, N), jnp.float32)
        settings = Settings(chunk=chunk, low_precision=low_precision, **settings)
        cu_seqlens = jnp.linspace(0, T, B + 1).astype(jnp.int32)

        def f(r, k, v, w, u, s0):
            if varlen:
                return binding.wkv_varlen(r, k, v, w, u, s0, cu_seqlens, settings=settings)
            return binding.wkv(r, k, v, w, u, s0, settings=settings)

        def loss(*a):
            y, s = f(*a)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

        calls = [(jax.grad(loss, argnums=tuple(range(6))), (x, x, x, x, u, s0))]
        if not varlen:
            calls.append((f, (x[:, :1],) * 4 + (u, s0)))
        for fn, args in calls:
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        common.interpret = saved
    return modules


def launch_settings(name, N=64, dtype="bfloat16"):
    from rwkv6_keras_operator.engines.pallas.settings import Settings

    field, stages = LAUNCH[name]
    if field is None:
        from rwkv6_keras_operator.engines.pallas import recurrent

        return recurrent.STEP.warps(N), stages
    settings = Settings()
    warps = getattr(settings, field)
    if name in ("wkv6_forward", "wkv6_backward"):
        return settings.chunk_warps(warps, N, dtype), stages
    return warps, stages


def compile_reports(modules, timeout=600, N=64, dtype="bfloat16"):
    """[report per kernel] from compiling `modules` (name -> IR) with triton in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, ir in modules.items():
            path = os.path.join(tmp, f"{name}.ttir")
            with open(path, "w") as f:
                f.write(ir)
            warps, stages = launch_settings(name, N, dtype)
            jobs.append({"name": name, "path": path, "warps": warps, "stages": stages})
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile", json.dumps(jobs)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or len(lines) != len(jobs):
            raise RuntimeError(f"triton compile failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-3000:]}")
        return [json.loads(line) for line in lines]


def cuobjdump():
    """The cuobjdump that the triton package ships (found without importing triton), or None."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _compile(job):
    """In the child process (triton only, no jax): compile one kernel and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(job["path"], target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=job["warps"], num_stages=job["stages"]))
    report = {"kernel": job["name"], "warps": job["warps"], "stages": job["stages"], "smem": kernel.metadata.shared}
    tool = cuobjdump()
    if tool is not None:
        cubin = job["path"] + ".cubin"
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        if found:
            report["registers"], report["stack"] = int(found.group(1)), int(found.group(2))
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
        report["mma"] = len(re.findall(r"\bH(?:G)?MMA\b", sass))
        report["sass_lines"] = sass.count("\n")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:
        for job in json.loads(sys.argv[2]):
            print(json.dumps(_compile(job)), flush=True)
        sys.exit(0)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("KERAS_BACKEND", "jax")
    args = sys.argv[1:] or ["64", "bfloat16", "32"]
    for i in range(0, len(args), 3):
        N, dtype, chunk = int(args[i]), args[i + 1], int(args[i + 2])
        for report in compile_reports(capture(N, dtype, chunk), N=N, dtype=dtype):
            print(N, dtype, chunk, report, flush=True)
