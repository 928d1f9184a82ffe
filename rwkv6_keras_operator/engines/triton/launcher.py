"""Launching a small Triton kernel with little host time: a decode step's kernel runs for about as long as Triton's
own Python takes to launch it (binding the arguments, computing their specialisation and the cache key, looking the
compiled kernel up), so a step's host time, not the GPU, would set its pace.

`CachedLaunch(fn)(grid, key, args, **options)` launches `fn[grid](*args, **options)`. The first launch of each `key`
takes Triton's normal path (which compiles or finds the kernel) and keeps the compiled kernel it returns; later
launches with that key call the kernel's launcher directly, exactly as the end of Triton's `JITFunction.run` does
(`kernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
*args)`, the same in Triton 3.6 and 3.9), on torch's current stream of the device (so also inside CUDA-graph
capture).

The caller's key must hold everything Triton specialises a compiled kernel on, apart from what this module adds:
the dtype of every tensor argument, the full value of every int argument (Triton specialises ints equal to 1,
divisible by 16, or past 32 bits), the constexprs, the launch options and the device. Triton also specialises on
each pointer being a multiple of ALIGNMENT bytes: a caller passes key None (the normal path) unless all its tensors
are (`aligned`).

Triton's check at each launch that the globals a kernel read have not changed since it was compiled is not repeated:
the engine's kernels read constants only (common.py).

The normal path is taken throughout where the direct call is not known to be right: under the Triton interpreter (a
kernel that is not a compiled `JITFunction`), for Triton versions outside those whose launch convention was read
(SUPPORTED) or whose `JITFunction.run` does not end with that call (RUN_LAUNCH, checked in its source at the first
launch), with launch hooks installed (profilers), or in Triton's debug mode.
"""
import warnings

import torch
import triton

# Triton releases whose JITFunction.run ends with the launcher call above (read in the sources of 3.6 and 3.9).
SUPPORTED = ((3, 6), (3, 9))
ALIGNMENT = 16   # bytes: Triton specialises a pointer argument on being a multiple of it


def _version():
    try:
        return tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return None


def _knobs():
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs


def _is_compiled_jit(fn):
    from triton.runtime.jit import JITFunction

    return isinstance(fn, JITFunction)


# How JITFunction.run launches a compiled kernel, in the versions read; the direct call repeats it.
RUN_LAUNCH = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
              "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())")


def _run_launches_as_read():
    """This Triton's JITFunction.run launches a compiled kernel with the call RUN_LAUNCH (its source, whitespace
    aside): False where the source cannot be read or differs."""
    import inspect

    from triton.runtime.jit import JITFunction

    try:
        source = inspect.getsource(JITFunction.run)
    except (OSError, TypeError):
        return False
    return "".join(RUN_LAUNCH.split()) in "".join(source.split())


def _idle(hook):
    """No launch hook is installed: None, or an empty chain of hooks (triton.knobs.HookChain)."""
    return hook is None or getattr(hook, "calls", None) == []


def _raw_stream(device_index):
    return torch._C._cuda_getCurrentRawStream(device_index)


class CachedLaunch:
    """Launches one @triton.jit kernel; see the module's docstring. `fast_launches` counts the launches that took the
    direct call (tests read it). stream(device_index): the raw stream to launch on; runtime: Triton's runtime knobs
    (hooks, debug). Tests and benchmarks pass stand-ins for both (then fn is taken to be compiled, whatever it is)."""

    def __init__(self, fn, stream=_raw_stream, runtime=None):
        self.fn = fn
        self.stream = stream
        self.kernels = {}
        self.fast_launches = 0
        self._runtime = runtime
        # Decided at the first launch (whether the interpreter runs fn is settled when the kernel is defined).
        self.enabled = True if runtime is not None else None

    def _enable(self):
        knobs = _knobs()
        version = _version()
        self.enabled = bool(
            knobs is not None and version is not None and SUPPORTED[0] <= version <= SUPPORTED[1]
            and _is_compiled_jit(self.fn) and not getattr(knobs.compilation, "instrumentation_mode", "")
            and _run_launches_as_read())
        self._runtime = knobs.runtime if self.enabled else None
        return self.enabled

    def _direct(self):
        """The direct call is right now: no launch hooks and no debug mode (both may be switched on at any time)."""
        runtime = self._runtime
        return not runtime.debug and _idle(runtime.launch_enter_hook) and _idle(runtime.launch_exit_hook)

    def __call__(self, grid, key, args, device_index, **options):
        """fn[grid](*args, **options) on the current CUDA device, device_index (-1: the CPU, the interpreter). grid: a
        tuple of up to 3 ints; key: see the module's docstring, or None (the normal path); args: every parameter of
        fn in order, constexprs included (positionally)."""
        enabled = self.enabled if self.enabled is not None else self._enable()
        if enabled and key is not None and self._direct():
            found = self.kernels.get(key)
            if found is not None:
                run, function, packed = found
                grid_1 = grid[1] if len(grid) > 1 else 1
                grid_2 = grid[2] if len(grid) > 2 else 1
                run(grid[0], grid_1, grid_2, self.stream(device_index), function, packed, None, None, None, *args)
                self.fast_launches += 1
                return
            kernel = self.fn[grid](*args, **options)
            self._keep(key, kernel, args)
            return
        self.fn[grid](*args, **options)

    def _keep(self, key, kernel, args):
        if hasattr(kernel, "result"):   # a compilation future (Triton's asynchronous compile mode)
            kernel = kernel.result()
        parts = [getattr(kernel, name, None) for name in ("run", "function", "packed_metadata")]
        if None in parts or len(args) != len(self.fn.params):
            self.enabled = False
            warnings.warn("rwkv6_keras_operator: this Triton's compiled kernels do not look as expected; kernels are "
                          "launched through Triton's normal path (more host time a launch).", stacklevel=3)
            return
        self.kernels[key] = tuple(parts)


def aligned(*tensors):
    """Every tensor (None: skipped) starts at a multiple of ALIGNMENT bytes, as the CUDA allocator places them."""
    bits = 0
    for x in tensors:
        if x is not None:
            bits |= x.data_ptr()
    return bits % ALIGNMENT == 0
