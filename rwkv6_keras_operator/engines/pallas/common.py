"""Pallas plumbing shared by every kernel of this engine, and the in-kernel helpers of docs/math.md: products at a
precision, the decays, tile loads.

Everything that touches the Pallas Triton API (`pallas_call`, `plgpu.load/store`, compiler parameters,
interpret mode) goes through this module, so that a later move to another Pallas backend stays local.

In-kernel helpers work on jax values inside a kernel body (tiles of at most a few hundred rows) and lower
both to Triton and to the CPU interpreter (`interpret=True`, used by the tests). The Triton lowering has
no value slicing, no reverse scan and only 2-D matrix products; everything below sticks to element-wise
ops, row/column reductions, `iota`, selects and products of 2-D tiles.
"""
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .. import packed
from ..shared import LOG2E, W_MAX, Precision

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16

# RWKV6_PALLAS_INTERPRET=1 runs every kernel in the Pallas interpreter (any device; slow). The tests use it
# on CPU; it also makes the engine selectable on machines without a GPU.
FORCE_INTERPRET = os.environ.get("RWKV6_PALLAS_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def on_gpu():
    """A CUDA GPU is jax's default backend (cached: the default backend does not change in a process)."""
    try:
        if jax.default_backend() != "gpu":
            return False
        device = jax.devices()[0]
        version = str(getattr(device.client, "platform_version", "")).lower()
        return device.platform == "gpu" and "rocm" not in version   # the kernels are written for CUDA GPUs
    except RuntimeError:
        return False


def interpret():
    """Run the kernels in the interpreter: forced, or no GPU to compile them for."""
    return FORCE_INTERPRET or not on_gpu()


def _params_class():
    # Renamed from TritonCompilerParams to CompilerParams in jax 0.7; the old name is gone in 0.8.
    return getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def call(kernel, *, grid, out_shape, num_warps=4, num_stages=2, name=None, input_output_aliases=None):
    """pallas_call with whole-array refs: each kernel indexes its own tiles by program id. input_output_aliases:
    {input index: output index} of outputs written over their input's buffer."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=_params_class()(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret(),
        name=name,
        input_output_aliases=input_output_aliases or {},
    )


def launch(kernel, inputs, **call_args):
    """call(kernel, **call_args) on the inputs that are not None; the kernel gets None for each absent one (an
    optional tensor, e.g. the chunk table of packed sequences), so that its code can branch on it while tracing."""
    present = [x is not None for x in inputs]

    def with_absent_inputs(*refs):
        refs = iter(refs)
        return kernel(*(next(refs) if p else None for p in present), *refs)

    return call(with_absent_inputs, **call_args)(*(x for x in inputs if x is not None))


program_id = pl.program_id
ds = pl.ds


def load(ref, mask=None):
    """Load a tile (zeros where `mask` is False), as float32."""
    if mask is None:
        return ref[...].astype(F32)
    return plgpu.load(ref, mask=mask, other=0).astype(F32)


def store(ref, value, mask=None):
    value = value.astype(ref.dtype)
    if mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=mask)


# --------------------------------------------------------------------------------------------------------
# Products of tiles, at a shared.Precision.
# --------------------------------------------------------------------------------------------------------
def mm(a, b, prec, ta=False, tb=False):
    """a @ b (a^T if ta, b^T if tb) in float32, with the products at `prec` (a shared.Precision)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    precision = None
    if prec in (Precision.BF16, Precision.F16):
        lo = BF16 if prec is Precision.BF16 else F16
        a, b = a.astype(lo), b.astype(lo)
    elif prec is Precision.TF32X3:
        precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    elif prec is Precision.IEEE:
        precision = lax.Precision.HIGHEST
    elif prec is not Precision.TF32:
        raise ValueError(f"unknown product precision {prec!r}")
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


# --------------------------------------------------------------------------------------------------------
# Decays (docs/math.md, rules 1-4).
# --------------------------------------------------------------------------------------------------------
def exp(x):
    """exp(x) of a float32 tile. Compiled: one MUFU.EX2 on x * log2(e) (ex2.approx.ftz), the approximation the
    lowering of jnp.exp also uses, without the rescaling it adds around it for results below 2^-126: those flush to
    0. Every exp here is a decay factor (exponent <= 0) or the log-decay's exp(w), for which a value below 2^-126 is
    0 next to the terms it is added to. The interpreter runs no inline assembly: jnp.exp there."""
    if interpret():
        return jnp.exp(x)
    return plgpu.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x * LOG2E], constraints="=f,f", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, F32)])[0]


def log_decay(w):
    """g = -exp(min(w, W_MAX)) <= 0 in float32, finite for every w (w = +100 gives g = -exp(60))."""
    return -exp(jnp.minimum(w.astype(F32), W_MAX))


# --------------------------------------------------------------------------------------------------------
# Tiles of a kernel: blocks of channels, rows of a chunk, accumulation.
# --------------------------------------------------------------------------------------------------------
def blocks(N, most=64):
    """Block size (at most `most`) for a key or value dimension of size N, and the block count."""
    size = min(N, most)
    return size, N // size


def num_chunks(T, L, table=None):
    """NC, the chunks of a launch: ceil(T / L), or the rows of the chunk table of packed sequences."""
    return -(-T // L) if table is None else table.shape[0]


def rows_of(c, L, T, table_ref=None):
    """The rows of chunk c, as a slice of L rows from its first token and the (L, 1) mask of the valid ones: tokens
    c * L ... c * L + L - 1 below T, or with table_ref (packed sequences, engines/packed.py) the count[c] tokens from
    start[c], so that no chunk straddles a sequence boundary. Invalid rows load as zeros (g = 0: decay 1)."""
    if table_ref is None:
        t0 = c * L
        return ds(t0, L), ((t0 + jnp.arange(L)) < T)[:, None]
    return ds(table_ref[c, packed.START], L), (jnp.arange(L) < table_ref[c, packed.COUNT])[:, None]


def chunk_program(table_ref, body, otherwise=None):
    """A chunk kernel's program (grid (NC, H, B)): body(c, h, b) for its chunk c, head h and row b. Without a table
    every chunk holds tokens; with one (packed sequences) the unused chunks at its end (count 0) skip the body and
    run otherwise(c, h, b) if given (what a chunk without rows must still write). The program ids are read here,
    outside the branch: the interpreter has none inside one."""
    c, h, b = program_id(0), program_id(1), program_id(2)
    if table_ref is None:
        body(c, h, b)
        return
    count = table_ref[c, packed.COUNT]
    pl.when(count > 0)(lambda: body(c, h, b))
    if otherwise is not None:
        pl.when(count == 0)(lambda: otherwise(c, h, b))


def add(acc, x):
    """acc + x, with acc None for an empty sum (so the first term is taken as it is)."""
    return x if acc is None else acc + x
