"""The pallas engine: the WKV operator as Pallas kernels (Triton lowering) for jax on CUDA GPUs.

Ships with jaxlib: no CUDA toolkit, compiler or build step. The math is docs/math.md; the kernels are

    chunked.py    per-chunk state terms and outputs         (parallel over chunks, rows, heads)
    scan.py       the scan of states over chunks            (sequential over chunks)
    grads.py      the backward inside each chunk            (parallel)
    recurrent.py  step by step, for short sequences         (decode)

composed by ops.py, made vmappable and SPMD-shardable by sharding.py, and differentiated by one
`jax.custom_vjp` (vjp.py). All Pallas API use is in core.py; the in-chunk math shared by the kernels is in
intra.py. `RWKV6_PALLAS_INTERPRET=1` runs the kernels in the
Pallas interpreter on any device (the CPU tests do).
"""
import warnings

NAME = "pallas"
BACKEND = "jax"

HEAD_SIZES = (16, 32, 64, 128, 256)
DTYPES = ("float32", "bfloat16", "float16")
# Sequences up to this length run the step-by-step kernel when no gradient is taken.
DECODE_MAX_T = 16
# Chunk length of the chunked kernels (a power of two >= 16).
CHUNK = 32
# Products for 16-bit inputs: "tf32" (float32 operands on the tensor cores) or "bf16"/"f16" (operands
# rounded to the input dtype; "bf16" applies to bfloat16 inputs only, float16 inputs then keep tf32). float32
# inputs always use float32-accurate products. bf16: fwd 3.8 -> 3.2 ms, fwd+bwd 7.3 -> 6.4 ms at the training
# shape on an H200, worst error against the float64 oracle 2.5e-3 (tf32: 1.7e-3; tolerance 1e-2); since the
# products with a state are bf16 too and the chunk states are stored in bfloat16 (core.state_prec, state_dtype):
# fwd+bwd 2.63 ms (device time), worst error 3.1e-3.
LOW_PRECISION = "bf16"

_warned = set()


def _core():
    try:
        from . import core
    except Exception:  # noqa: BLE001  (jax without Pallas Triton: the engine is simply unavailable)
        return None
    return core


def is_available():
    """True on jax with a CUDA GPU (or with RWKV6_PALLAS_INTERPRET=1)."""
    core = _core()
    return core is not None and (core.FORCE_INTERPRET or core.on_gpu())


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
    core = _core()
    if core.FORCE_INTERPRET:
        return True
    if isinstance(r, jax.core.Tracer):
        return core.on_gpu()
    try:
        return all(d.platform == "gpu" for d in r.devices())
    except AttributeError:
        return core.on_gpu()


def _traced(x):
    """x is a tracer: the call is part of a caller's jitted program, where the state may be updated in place."""
    import jax

    return isinstance(x, jax.core.Tracer)


def wkv(r, k, v, w, u, s0):
    """y (B, T, H, N) in r's dtype and the float32 state after the last step (B, H, N, N)."""
    from .vjp import wkv as _wkv

    return _wkv(r, k, v, w, u, s0, chunk=CHUNK, low_precision=LOW_PRECISION, decode_max_t=DECODE_MAX_T,
                in_place=_traced(r))


def decode(r, k, v, w, u, s0):
    """wkv of one token on (B, 1, C) inputs, the heads given by u (H, N): y (B, 1, C) and the final state.

    Inside a caller's jit the new state is written over the buffer of the old one (XLA copies s0 first only where
    the caller still needs it): in a decode loop, or with the state donated, no state is copied. Called eagerly,
    the new state gets a buffer of its own (the caller's s0 stays valid without a copy)."""
    from .vjp import decode as _decode

    return _decode(r, k, v, w, u, s0, chunk=CHUNK, low_precision=LOW_PRECISION, decode_max_t=DECODE_MAX_T,
                   in_place=_traced(r))


def pool_step(r, k, v, w, u, pool, slots):
    """One token for the rows whose states are pool[slots], written in place where XLA may (pool.py)."""
    from .pool import pool_step as _pool_step

    return _pool_step(r, k, v, w, u, pool, slots)
