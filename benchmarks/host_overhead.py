"""Host overhead of the operator's decode step (T = 1, state in and out), measured without a GPU.

The GPU engine's kernel is replaced by a stub and the engine is made to accept CPU tensors, so what is timed is the
Python between a call and Triton's launcher: argument checks and normalisation, the engine choice, the engine's own
allocations, the launch's cache key (engines/triton/launcher.py: after the first launch, the compiled kernel's
launcher is called directly; the stub's launcher does nothing). Not timed: Triton's C launcher and the driver.
Each row: the mean over --calls calls, the best of --repeats runs, microseconds.

    KERAS_BACKEND=torch python benchmarks/host_overhead.py            # Triton engine (kernel stubbed)
    KERAS_BACKEND=jax python benchmarks/host_overhead.py              # Pallas engine (wkv stubbed), eager calls
    ... --shape 64,32,64 --calls 1000 --json out.json

The host time does not depend on the shape except through allocation (torch.empty of a large CPU tensor costs what
the CPU allocator costs, unlike the CUDA caching allocator): the default shape is small.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator, engines  # noqa: E402
from rwkv6_keras_operator.arguments import prepare  # noqa: E402


def per_call_us(fn, calls, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / calls / 1e3)
    return best


class _NoHooks:
    def __init__(self):
        self.calls = []


class _StubCompiled:
    """Stands in for a compiled kernel: its launcher does nothing."""
    function = packed_metadata = 0

    @staticmethod
    def run(*args):
        return None


class _StubKernel:
    """Stands in for the step kernel: the engine's launch code runs (launcher.CachedLaunch, its key and its direct
    call), Triton's launcher and the GPU do not."""

    def __init__(self, params):
        self.params = params

    def __getitem__(self, grid):
        return lambda *args, **options: _StubCompiled


def torch_rows(B, H, N, calls, repeats):
    import inspect
    from types import SimpleNamespace

    import torch

    from rwkv6_keras_operator.engines import triton as engine
    from rwkv6_keras_operator.engines.triton import binding, launcher, recurrent

    params = list(inspect.signature(recurrent.step_kernel.fn).parameters)
    runtime = SimpleNamespace(debug=False, launch_enter_hook=_NoHooks(), launch_exit_hook=_NoHooks())
    recurrent.LAUNCH = launcher.CachedLaunch(_StubKernel(params), stream=lambda device: 0, runtime=runtime)
    engine._AVAILABLE = True
    engine.supports = lambda r, head_size: True               # CPU tensors stand in for CUDA ones
    engines._CHOSEN.clear()
    C = H * N
    r, k, v, w = (torch.randn(B, 1, C) for _ in range(4))
    u, s = torch.randn(H, N), torch.randn(B, H, N, N)
    op = RWKVKernelOperator(N)
    a = prepare(N, r, k, v, w, u, s)
    pool, slots = torch.randn(4 * B, H, N, N), torch.arange(B) * 4   # slots kept as a tensor, as a server does
    timed = lambda fn: per_call_us(fn, calls, repeats)  # noqa: E731
    with torch.no_grad():
        return {
            "op(...) decode step": timed(lambda: op(r, k, v, w, u, with_state=True, init_state=s)),
            "op.step (a pool of 4B, slots a tensor)": timed(lambda: op.step(r, k, v, w, u, pool, slots)),
            "engine alone (binding.wkv)": timed(lambda: binding.wkv(a.r, a.k, a.v, a.w, a.u, a.s0)),
            "engine alone (binding.decode)": timed(lambda: binding.decode(r, k, v, w, u, s)),
            "prepare (checks, reshapes)": timed(lambda: prepare(N, r, k, v, w, u, s)),
            "engines.select": timed(lambda: engines.select(a.r, N, False)),
            "floor: allocate y and state": timed(lambda: (torch.empty_like(a.r), torch.empty((B, H, N, N)))),
        }


def jax_rows(B, H, N, calls, repeats):
    import jax.numpy as jnp

    from rwkv6_keras_operator.engines import pallas as engine

    C = H * N
    y_out, s_out = jnp.zeros((B, 1, H, N)), jnp.zeros((B, H, N, N))
    y_flat = y_out.reshape(B, 1, H * N)
    stubs = {"wkv": lambda *args: (y_out, s_out), "decode": lambda *args: (y_flat, s_out),
             "is_available": lambda: True, "supports": lambda r, head_size: True}
    saved = {name: getattr(engine, name) for name in stubs}
    for name, stub in stubs.items():
        setattr(engine, name, stub)
    try:
        r, k, v, w = (jnp.ones((B, 1, C)) for _ in range(4))
        u, s = jnp.ones((H, N)), jnp.ones((B, H, N, N))
        op = RWKVKernelOperator(N)
        a = prepare(N, r, k, v, w, u, s)
        return {
            "op(...) decode step (engine stubbed)": per_call_us(
                lambda: op(r, k, v, w, u, with_state=True, init_state=s), calls, repeats),
            "prepare (checks, reshapes)": per_call_us(lambda: prepare(N, r, k, v, w, u, s), calls, repeats),
            "engines.select": per_call_us(lambda: engines.select(a.r, N, False), calls, repeats),
        }
    finally:
        for name, original in saved.items():
            setattr(engine, name, original)


def jax_engine_rows(B, H, N, calls, repeats):
    """The Pallas engine's jitted decode called eagerly (its dispatch), against a jitted identity-like program."""
    import jax
    import jax.numpy as jnp

    from rwkv6_keras_operator.engines.pallas import common

    common.FORCE_INTERPRET = True
    from rwkv6_keras_operator.engines import pallas

    C = H * N
    r, k, v, w = (jnp.ones((B, 1, C)) for _ in range(4))
    u, s = jnp.ones((H, N)), jnp.ones((B, H, N, N))
    op = RWKVKernelOperator(N)
    floor = jax.jit(lambda r, k, v, w, u, s: (r * 1, s * 1))
    return {
        "op(...) decode step (interpreted kernel)": per_call_us(
            lambda: op(r, k, v, w, u, with_state=True, init_state=s), calls, repeats),
        "engine alone (pallas.decode)": per_call_us(lambda: pallas.decode(r, k, v, w, u, s), calls, repeats),
        "floor: a jitted call of 6 arrays": per_call_us(lambda: floor(r, k, v, w, u, s), calls, repeats),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2,2,64", help="B,H,N of the decode step (default 2,2,64)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=300, help="runs of --calls calls; the best is kept (on a shared "
                        "machine, the run least disturbed by other work)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--engine", action="store_true", help="jax: also time the Pallas engine's jitted decode "
                        "called eagerly (in the interpreter: the dispatch, not the kernel, is what differs)")
    args = parser.parse_args(argv)
    B, H, N = (int(x) for x in args.shape.split(","))
    backend = keras.backend.backend()
    rows = {"torch": torch_rows, "jax": jax_rows}[backend](B, H, N, args.calls, args.repeats)
    if backend == "jax" and args.engine:
        rows.update(jax_engine_rows(B, H, N, args.calls, args.repeats))
    print(f"host overhead of a decode step, {backend}, B={B} H={H} N={N}, us a call (best of {args.repeats} x "
          f"{args.calls} calls):")
    for name, us in rows.items():
        print(f"  {name:<40} {us:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": backend, "shape": [B, H, N], "us": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
