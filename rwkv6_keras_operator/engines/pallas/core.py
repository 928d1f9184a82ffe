"""Pallas plumbing shared by every kernel of this engine, and the in-kernel math of docs/math.md.

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

from ..portable.chunked import W_MAX

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


# Launch parameters, read when a kernel is traced (the benchmark sweeps them; defaults from the register
# and spill reports of the compiled kernels, see benchmarks/notes_pallas.md).
# Measured on an H200 (benchmarks/RESULTS.md): at the training shape, bf16, 4 warps for `output` and `grads`
# (instead of 8) and 32 value columns a scan program (instead of 16, 2 warps) took fwd 3.49 -> 2.36 ms and
# fwd+bwd 7.5 -> 5.9 ms together with the bf16 products and 16-bit decay sums (pieces()).
TUNING = {
    "terms_warps": 4,
    "output_warps": 4,       # N <= 64 and 16-bit inputs; else at least 8 (see warps())
    "output_stages": 2,
    "grads_warps": 4,        # idem
    "scan_warps": 4,
    "scan_block": 32,        # value columns per scan program
    "fused_keys": 32,        # the fused scan (scan.states): key rows of S per program (each program builds the
    "fused_block": 64,       # decays of its own keys; H200, training shape: 32 x 64 fwd 1.68 / fwd+bwd 4.80 ms,
                             # 64 x 32 1.84 / 5.09, 32 x 32 2.02 / 5.42), value columns per program,
    "fused_warps": 4,
    "fused_stages": 3,       # software-pipeline stages of its loop over chunks (long context: fwd 0.85 ms with 3,
                             # 1.40 with 1; training shape: 1.25 with 3, 1.30 with 2)
    "fused_narrow_below": 512,   # fewer programs than this with fused_keys: key blocks of fused_keys_few rows,
    "fused_keys_few": 16,
    "fused_min_programs": 128,   # fewer programs than this: state terms in parallel, then the plain scan (long
                                 # context, 128 programs of 16 keys: fused fwd 0.85 ms against 1.02)
    "recurrent_block": 32,   # value columns per step-by-step program
    "recurrent_warps": 2,
}


def warps(key, N, dtype):
    """num_warps of a chunk kernel: TUNING[key] where it was measured (N <= 64, 16-bit inputs); larger tiles (float32
    operands, N = 128, 256) keep 8 warps, which the compiled kernels need to stay clear of heavy register spills."""
    if N <= 64 and jnp.dtype(dtype) != F32:
        return TUNING[key]
    return max(TUNING[key], 8)


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
# Precision of the products of tiles. A kernel takes one `prec` (a static string) for its main products:
#   "bf16"/"f16": operands rounded to the input dtype, float32 accumulation (tensor cores, fastest; only
#                 inside a chunk: products with a state use state_prec);
#   "tf32": float32 operands in the tensor cores' tf32 mode (10-bit mantissa);
#   "tf32x3": three tf32 products that carry float32 accuracy (the float32 path on GPU);
#   "ieee": exact float32 products (the interpreter's choice for float32).
# --------------------------------------------------------------------------------------------------------
def resolve_prec(dtype, mode=None):
    """The product precision for inputs of `dtype` (mode overrides the default for 16-bit inputs)."""
    if jnp.dtype(dtype) == jnp.float32:
        return "ieee" if interpret() else "tf32x3"
    if mode == "bf16" and jnp.dtype(dtype) != BF16:
        return "tf32"   # "bf16" rounds bfloat16 inputs' products only: float16 values would lose 3 bits
    return mode or "tf32"


def state_prec(prec):
    """Precision of the products with a state (or its gradient). The state itself stays float32; as an operand it is
    rounded like the inputs' own products for bfloat16 ("bf16": bfloat16 has float32's range, so nothing overflows,
    and its 8 bits are those of the inputs), never to float16: a state may grow to any size (with decays of exactly
    1 it sums every k v^T of the sequence), past float16's range, so "f16" gives tf32. The Triton engine does the
    same (engines/triton/common.py, Precisions)."""
    return "tf32" if prec == "f16" else prec


def state_dtype(prec):
    """dtype of the chunk states the scans store for the chunk kernels (and of their gradients): bfloat16 where the
    products round them to bfloat16 anyway (state_prec "bf16"), at half the traffic; float32 otherwise. The scans
    carry every state in float32; the final state and the gradient of s0 are float32 always (the Triton engine:
    binding.states_dtype)."""
    return BF16 if state_prec(prec) == "bf16" else F32


def mm(a, b, prec, ta=False, tb=False):
    """a @ b (a^T if ta, b^T if tb) in float32, with the products at precision `prec`."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    precision = None
    if prec in ("bf16", "f16"):
        lo = BF16 if prec == "bf16" else F16
        a, b = a.astype(lo), b.astype(lo)
    elif prec == "tf32x3":
        precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    elif prec == "ieee":
        precision = lax.Precision.HIGHEST
    elif prec != "tf32":
        raise ValueError(f"unknown product precision {prec!r}")
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


# --------------------------------------------------------------------------------------------------------
# Decays (docs/math.md, rules 1-4).
# --------------------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634


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


def split3(x, pieces=3):
    """bfloat16 tiles whose sum is the float32 tile x: 3 pieces carry all 24 bits (exact), 2 carry 16, 1 carries 8."""
    hi = x.astype(BF16)
    if pieces == 1:
        return (hi,)
    rest = x - hi.astype(F32)
    mid = rest.astype(BF16)
    if pieces == 2:
        return hi, mid
    return hi, mid, (rest - mid.astype(F32)).astype(BF16)


def pieces(prec):
    """Pieces of split3 for the masked sums (the decay sums of g, and the gradient sums of dg): all 24 bits for
    float32 inputs; 16 bits for 16-bit inputs, whose gradients carry 8 to 11 bits, and for whose decays 16 bits of g
    mean a relative error of at most 2^-17 |sum g| in a factor exp(sum g) (below 3e-4 for every factor above e^-30,
    against the 2^-9 of bfloat16 inputs; docs/math.md, rule 3)."""
    return 3 if prec in ("tf32x3", "ieee") else 2


def dg_pieces(prec):
    """Pieces of split3 for the gradient sums of dg: as pieces(prec), but one for bfloat16 products ("bf16"), whose
    operands round every term of dg to 8 bits already (the Triton engine: Precisions.DG_PIECES)."""
    return 1 if prec == "bf16" else pieces(prec)


def masked_sum(mask, parts):
    """sum_m mask[t, m] * x[m, :] for a 0/1 mask, x given by split3(x).

    Each product is exact (0 or 1 times a bfloat16 value) and accumulates in float32, so the result is a
    direct sum of exactly the selected terms: for a mask over a contiguous range of g <= 0 that is the sum
    of rule 1 (no difference of running sums, no cancellation).
    """
    m = mask.astype(BF16)
    out = None
    for part in reversed(parts):   # smallest first
        term = mm(m, part, "bf16")
        out = term if out is None else out + term
    return out


# --------------------------------------------------------------------------------------------------------
# Masks over positions of one chunk of L tokens (t, s, m in [0, L)).
# --------------------------------------------------------------------------------------------------------
def log2(L):
    k = L.bit_length() - 1
    assert L == 1 << k, L
    return k


def in_range(L, lo, hi, rows=True):
    """[L x L] mask: (rows) row i holds the columns lo[i] <= j < hi[i]; (not rows) column j holds the rows
    lo[j] <= i < hi[j]. Each entry is two compares against a bound of its row or column (as cheap as a mask gets
    in the layout of a product's operand, where every warp holds the whole tile)."""
    i = jnp.arange(L, dtype=jnp.int32)
    if rows:
        return (i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])
    return (i[:, None] >= lo[None, :]) & (i[:, None] < hi[None, :])


def before_mask(L, shift):
    """[t, m]: m lies before t inside t's block of h = 2**shift positions (shift may be traced)."""
    t = jnp.arange(L, dtype=jnp.int32)
    return in_range(L, (t >> shift) << shift, t)


def after_mask(L, shift):
    """[s, m]: m lies after s inside s's block of h = 2**shift positions."""
    s = jnp.arange(L, dtype=jnp.int32)
    return in_range(L, s + 1, ((s >> shift) + 1) << shift)


def pair_mask(L, shift):
    """[t, s]: the pairs split at level h = 2**shift: t in the lower, s in the upper half of a 2h-block (rows t of
    upper halves hold none)."""
    t = jnp.arange(L, dtype=jnp.int32)
    lo = (t >> (shift + 1)) << (shift + 1)
    return in_range(L, lo, jnp.where(((t >> shift) & 1) == 1, lo + (1 << shift), lo))


def span_bounds(L, shift):
    """[lo_q, hi_q): the positions m whose d_m position q's level-2**shift factor holds: m in q's own h-block, before
    q where q lies in a lower half (q is a later member t of a pair: pre_h) and after q where it lies in an upper half
    (an earlier member s: suf_h)."""
    q = jnp.arange(L, dtype=jnp.int32)
    blk = (q >> shift) << shift
    lower = ((q >> shift) & 1) == 1
    return jnp.where(lower, blk, q + 1), jnp.where(lower, q, blk + (1 << shift))


def level_mask(L, shift):
    """[q, m]: the range of g summed into q's level-2**shift factor (intra.ChunkKeys.level)."""
    return in_range(L, *span_bounds(L, shift))


def span_mask(L, shift):
    """[m, q]: for the pairs of level h = 2**shift, q is a position whose term spans m: q after m in a
    lower half (q is the later member t of a pair), or q before m in an upper half (q is the earlier s)."""
    return in_range(L, *span_bounds(L, shift), rows=False)
