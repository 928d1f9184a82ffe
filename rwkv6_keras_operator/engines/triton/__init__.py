"""The Triton engine: torch backend, CUDA GPUs. Exact chunked kernels (docs/math.md), a one-step kernel for
T == 1, bound as torch.library custom ops with autograd (see binding.py).

Triton and the kernels are imported on first use, so importing the package never needs Triton. On a machine
without a CUDA device the operator never picks this engine (is_available() is False); tests run the same
kernels on CPU tensors under TRITON_INTERPRET=1 by calling `wkv` directly.
"""
import importlib.util
import sys
import warnings

from .settings import Settings

NAME = "triton"
BACKEND = "torch"
HEAD_SIZES = (16, 32, 64, 128)
DTYPES = ("float32", "bfloat16", "float16")
# The launch settings of the operator's calls (tests and benchmarks pass their own to binding.wkv).
SETTINGS = Settings()


def _probe():
    try:
        import torch
    except ImportError:
        return False
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


# Probed once, at import (cheap: no CUDA context is created), so that is_available() is a constant that
# torch.compile can trace through.
_AVAILABLE = _probe()


def is_available():
    return _AVAILABLE


_warned = set()


def supports(r, head_size):
    """CUDA tensors of a supported dtype and head size; any other head size warns once and runs portable."""
    if not getattr(r, "is_cuda", False) or str(r.dtype).replace("torch.", "") not in DTYPES:
        return False
    if head_size not in HEAD_SIZES:
        if head_size not in _warned:
            _warned.add(head_size)
            warnings.warn(f"rwkv6_keras_operator: the Triton engine supports head sizes {HEAD_SIZES}; "
                          f"head_size={head_size} runs the portable engine (slower).", stacklevel=3)
        return False
    return True


def _loaded(name):
    """The submodule `name` once imported: a dict lookup on the hot path (an import statement costs a microsecond a
    call), except under torch.compile, which follows an import statement but not a lookup that changes as it traces."""
    import torch

    return None if torch.compiler.is_compiling() else sys.modules.get(f"{__name__}.{name}")


def _binding():
    module = _loaded("binding")
    if module is None:
        from . import binding as module
    return module


def wkv(r, k, v, w, u, s0):
    return _binding().wkv(r, k, v, w, u, s0, SETTINGS)


def wkv_varlen(r, k, v, w, u, s0, cu_seqlens):
    return _binding().wkv_varlen(r, k, v, w, u, s0, cu_seqlens, SETTINGS)


def decode(r, k, v, w, u, s0):
    return _binding().decode(r, k, v, w, u, s0, SETTINGS)


def pool_step(r, k, v, w, u, pool, slots):
    module = _loaded("pool")
    if module is None:
        from . import pool as module
    return module.pool_step(r, k, v, w, u, pool, slots)
