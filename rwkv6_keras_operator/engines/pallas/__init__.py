"""The pallas engine: the WKV operator as Pallas kernels (Triton lowering) for jax on CUDA GPUs.

Ships with jaxlib: no CUDA toolkit, compiler or build step. The math is docs/math.md, the file layout docs/engines.md
(the same file names and roles as the Triton engine's):

    forward.py    the outputs of each chunk                  (parallel over chunks, rows, heads)
    backward.py   the gradients inside each chunk            (parallel)
    scan.py       the states at the chunk starts             (sequential over chunks)
    recurrent.py  step by step, for short sequences          (decode)
    levels.py     the binary tree of levels inside a chunk, masks.py its masks and masked sums
    common.py     every use of the Pallas API, products, decays, tiles
    binding.py    the ops composed of kernel launches and their `jax.custom_vjp`
    sharding.py   makes those ops vmappable and SPMD-shardable

`RWKV6_PALLAS_INTERPRET=1` runs the kernels in the Pallas interpreter on any device (the CPU tests do).
"""
import functools
import warnings

from .settings import Settings

NAME = "pallas"
BACKEND = "jax"

HEAD_SIZES = (16, 32, 64, 128, 256)
DTYPES = ("float32", "bfloat16", "float16")
# The settings of the operator's calls (tests and benchmarks pass their own to binding.wkv).
SETTINGS = Settings()

_warned = set()


def _common():
    try:
        from . import common
    except Exception:  # noqa: BLE001  (jax without Pallas Triton: the engine is simply unavailable)
        return None
    return common


def is_available():
    """True on jax with a CUDA GPU (or with RWKV6_PALLAS_INTERPRET=1)."""
    common = _common()
    return common is not None and (common.FORCE_INTERPRET or common.on_gpu())


def supports(r, head_size):
    """Head size and dtype this engine compiles for, and r on a GPU (tracers: jax's default backend)."""
    import jax
    import keras

    dtype = keras.backend.standardize_dtype(r.dtype)
    if head_size not in HEAD_SIZES or dtype not in DTYPES:
        if (head_size, dtype) not in _warned:
            _warned.add((head_size, dtype))
            warnings.warn(f"rwkv6_keras_operator: the pallas engine takes head sizes {HEAD_SIZES} and dtypes "
                          f"{DTYPES}; head_size={head_size}, dtype={dtype} runs the portable engine.")
        return False
    common = _common()
    if common.FORCE_INTERPRET:
        return True
    if isinstance(r, jax.core.Tracer):
        return common.on_gpu()
    try:
        return all(d.platform == "gpu" for d in r.devices())
    except AttributeError:
        return common.on_gpu()


def _traced(x):
    """x is a tracer: the call is part of a caller's jitted program, where the state may be updated in place."""
    import jax

    return isinstance(x, jax.core.Tracer)


def wkv(r, k, v, w, u, s0):
    """y (B, T, H, N) in r's dtype and the float32 state after the last step (B, H, N, N)."""
    from ...distributed.jax import time_sharding

    if time_sharding():   # inputs may be sharded along T too (distributed/jax.py)
        return _time_parallel_wkv(SETTINGS)(r, k, v, w, u, s0)
    from .binding import wkv as _wkv

    return _wkv(r, k, v, w, u, s0, settings=SETTINGS, in_place=_traced(r))


@functools.lru_cache(maxsize=None)
def _time_parallel_wkv(settings):
    from ...distributed.jax import ChunkedKernels, time_parallel
    from . import binding, scan

    def config(x, L):
        return dict(L=L, precisions=binding.precisions(x.dtype, settings.low_precision), settings=settings)

    kernels = ChunkedKernels(
        chunk_length=settings.chunk_length,
        forward=lambda r, k, v, w, u, s0, L: binding.forward_impl(r, k, v, w, u, s0, **config(r, L)),
        backward=lambda r, k, v, w, u, states, dy, dsT, L: binding.backward_impl(r, k, v, w, u, states, dy, dsT,
                                                                                 **config(r, L)),
        scan=lambda k, v, w, s0, L: scan.launch_scan(k, v, w, s0, **config(k, L))[0])
    return time_parallel(functools.partial(binding.wkv, settings=settings), kernels)


def wkv_varlen(r, k, v, w, u, s0, cu_seqlens):
    """Packed sequences (cu_seqlens, batch size 1): y (1, T, H, N) in r's dtype and the n final states (n, H, N, N)
    float32, as engines/portable/varlen.py (the protocol in engines/__init__.py)."""
    from .binding import wkv_varlen as _wkv_varlen

    return _wkv_varlen(r, k, v, w, u, s0, cu_seqlens, settings=SETTINGS)


def decode(r, k, v, w, u, s0):
    """wkv of one token on (B, 1, C) inputs, the heads given by u (H, N): y (B, 1, C) and the final state.

    Inside a caller's jit the new state is written over the buffer of the old one (XLA copies s0 first only where
    the caller still needs it): in a decode loop, or with the state donated, no state is copied. Called eagerly,
    the new state gets a buffer of its own (the caller's s0 stays valid without a copy)."""
    from .binding import decode as _decode

    return _decode(r, k, v, w, u, s0, settings=SETTINGS, in_place=_traced(r))


def pool_step(r, k, v, w, u, pool, slots):
    """One token for the rows whose states are pool[slots], written in place where XLA may (pool.py)."""
    from .pool import pool_step as _pool_step

    return _pool_step(r, k, v, w, u, pool, slots)
