"""Engine discovery and dispatch.

An engine is a sub-package here that satisfies the `Engine` protocol below; tests/engines/test_protocol.py checks
every engine that can run on the machine against it. Engines are imported only when their backend is the active
one. What all engines share (the clamp of w, the chunk length rule, the precisions) is in shared.py; the layout of
the two GPU engines, file by file, in docs/engines.md.

Optional, for one token a row (the operator uses them where an engine has them):

    decode(r, k, v, w, u, s0) -> (y, state)                  # r, k, v, w: (B, 1, C); y (B, 1, C); as wkv
    pool_step(r, k, v, w, u, pool, slots) -> (y, pool)       # RWKVKernelOperator.step, without gradients
    wkv_varlen(r, k, v, w, u, s0, cu_seqlens) -> (y, states) # packed sequences (cu_seqlens); as the portable one

pool_step: r, k, v, w (B, C) or (B, 1, C), y in r's shape; pool (n, H, N, N) float32; slots (B,) distinct ints, a
backend tensor on the pool's device; advances the states pool[slots] by one token (in place under torch).

wkv_varlen: r, k, v, w (1, T, H, N); u (H, N) float32; s0 (n, H, N, N) float32 start states or None (zeros);
cu_seqlens (n + 1,) int32 backend tensor (checked by the caller); returns y (1, T, H, N) in r's dtype and the n
final states (n, H, N, N) float32, an empty sequence's being its start state. Gradients as for wkv. Engines without
it leave packed calls to the portable engine (engines/portable/varlen.py).
"""
import importlib
import os
import sys
from typing import Protocol, runtime_checkable

import keras


@runtime_checkable
class Engine(Protocol):
    """What an engine module provides (a module satisfies it: isinstance(module, Engine)).

    wkv takes r, k, v, w: (B, T, H, N) backend tensors of one float dtype, u: (H, N) float32 and s0: (B, H, N, N)
    float32 or None (zeros), and returns y: (B, T, H, N) in r's dtype and the (B, H, N, N) float32 state after the
    last step. Gradients flow to all six inputs (through the framework's autodiff or the engine's own backward) and
    through the returned state.
    """
    NAME: str      # "portable", "triton", "pallas"
    BACKEND: str   # the Keras backend it runs under ("any" for the portable engine)

    def is_available(self) -> bool:
        """Whether it can run on this machine at all (framework, GPU); cheap, cached."""

    def supports(self, r, head_size: int) -> bool:
        """Whether it can take these concrete tensors (device, dtype, head size); may warn once."""

    def wkv(self, r, k, v, w, u, s0):
        """(y, state) as above."""


# Read once, at import (as documented): OPS_KERNEL=1 routes every call to the portable engine.
FORCE_PORTABLE = os.environ.get("OPS_KERNEL", "0").strip().lower() in ("1", "true", "yes", "on")

# GPU engines in order of preference, per backend: (backend, module under this package).
GPU_ENGINES = (("torch", "triton"), ("jax", "pallas"))
_TORCH = keras.backend.backend() == "torch"   # the backend is fixed once keras is imported


def _engine(name):
    # A dict lookup, not importlib, on the hot path: torch.compile (dynamo) can trace it.
    module = sys.modules.get(f"{__name__}.{name}")
    return module if module is not None else importlib.import_module(f"{__name__}.{name}")


def portable_engine():
    return _engine("portable")


def gpu_engines(backend=None):
    """The GPU engines of `backend` (default: the active one) that can run on this machine."""
    backend = backend or keras.backend.backend()
    found = []
    for engine_backend, name in GPU_ENGINES:
        if engine_backend == backend:
            engine = _engine(name)
            if engine.is_available():
                found.append(engine)
    return found


def available():
    """Every engine that can run here under the active backend, portable last."""
    return [*gpu_engines(), portable_engine()]


def _choose(r, head_size):
    for engine in gpu_engines():
        if engine.supports(r, head_size):
            return engine
    return portable_engine()


# The engine chosen for torch tensors of one device and dtype and a head size (all that `supports` looks at).
_CHOSEN = {}


def _choice_key(r, head_size):
    """The key of _CHOSEN for r, or None where the choice is made every call (other backends, whose arrays or
    tracers say less cheaply where they live, and torch.compile, which traces this function)."""
    if not _TORCH:
        return None
    import torch

    if not isinstance(r, torch.Tensor) or torch.compiler.is_compiling():
        return None
    return r.device, r.dtype, head_size


def select(r, head_size, ops_loop):
    """The engine for one call: OPS_KERNEL and ops_loop (for T == 1) pick the portable engine."""
    if FORCE_PORTABLE or (ops_loop and r.shape[1] == 1):
        return portable_engine()
    key = _choice_key(r, head_size)
    if key is None:
        return _choose(r, head_size)
    engine = _CHOSEN.get(key)
    if engine is None:
        engine = _CHOSEN[key] = _choose(r, head_size)
    return engine


def _import_active_engines():
    """Import the active backend's engines now, so that the first call may already be under torch.compile."""
    for engine_backend, name in GPU_ENGINES:
        if engine_backend == keras.backend.backend():
            _engine(name)
    _engine("portable")


_import_active_engines()
