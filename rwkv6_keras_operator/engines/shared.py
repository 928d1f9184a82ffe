"""What every engine shares: the clamp of w, the chunk length rule and the precisions of the products.

The three engines write the same math (docs/math.md) in three languages (keras.ops, Triton, Pallas); the numbers and
rules they must agree on live here, so that no engine imports them from another one. Plain Python: importing this
module needs no framework.
"""
import dataclasses
import enum

# exp(-exp(60)) is exactly 0.0 in float32, as is the true decay of any larger w: clamping w at W_MAX before exp(w)
# changes no decay and keeps g = -exp(w) finite (g >= -1.1e26, so sums of a chunk of them stay finite too;
# docs/math.md, rule 4).
W_MAX = 60.0
# exp(g) is 0.0 in float32 for g below log(2^-150) (half the smallest subnormal): a decay of exactly 0.
G_ZERO = -103.97208
# log2(e): the GPU kernels take exp(x) as one ex2 instruction on x * LOG2E.
LOG2E = 1.4426950408889634


def chunk_length(T, longest, shortest=1):
    """L, the chunk length for a sequence of T tokens: the smallest power of two >= min(T, longest), and at least
    `shortest` (both powers of two). Long sequences get chunks of `longest`; a short one pads to a power of two
    instead of a whole chunk."""
    L = shortest
    while L < min(T, longest):
        L *= 2
    return L


class Precision(enum.Enum):
    """How a product of two float32 tiles is computed; it accumulates in float32 in every mode."""
    BF16 = "bf16"       # operands rounded to bfloat16 (the tensor cores' fastest mode)
    F16 = "f16"         # operands rounded to float16
    TF32 = "tf32"       # float32 operands in the tensor cores' tf32 mode (10-bit mantissa)
    TF32X3 = "tf32x3"   # three tf32 products that carry float32 accuracy
    IEEE = "ieee"       # exact float32 products (the interpreters)


@dataclasses.dataclass(frozen=True)
class Precisions:
    """The precisions of one call's kernels (docs/math.md, rule 3). g, the decay factors, the state itself and every
    sum stay float32 whatever these say.

    prec          products of tiles inside a chunk;
    state_prec    products with a state or its gradient: as prec, except that a state is never rounded to float16 (a
                  state may grow past float16's range, for example with decays of exactly 1, which sum every k v^T of
                  the sequence); bfloat16 has float32's range, so a state rounded to it as an operand cannot overflow;
    mask_prec     the masked sums: 0/1 masks times bfloat16 pieces, exact in bfloat16;
    pieces        bfloat16 pieces of g in its masked sums: 3 carry all 24 bits, 2 carry 16 (16-bit inputs, whose own
                  values carry 8 to 11; the error of exp(sum g) grows with |sum g|: docs/math.md);
    dg_pieces     bfloat16 pieces of the terms of dg in their masked sums: as pieces, but 1 for bfloat16 products,
                  which round every term to 8 bits already;
    states_dtype  "bfloat16" or "float32": the dtype of the chunk states (and of their gradients) that the scans
                  store for the chunk kernels. bfloat16 where the products round them to bfloat16 anyway (half the
                  traffic, the same products); the scans carry every state in float32, and the final state and the
                  gradient of s0 are float32 always.
    """
    prec: Precision
    state_prec: Precision
    mask_prec: Precision
    pieces: int
    dg_pieces: int
    states_dtype: str


def precisions(dtype, low_precision=Precision.BF16):
    """The Precisions of the compiled GPU kernels for inputs of `dtype` ("float32", "bfloat16" or "float16").

    float32 inputs get float32-exact products (TF32X3). `low_precision` (a Precision or its value) picks the
    products of 16-bit inputs: BF16 rounds the operands of bfloat16 inputs to bfloat16, while float16 inputs keep
    TF32 (bfloat16 would drop 3 of their bits); F16 rounds operands to float16; TF32 keeps float32 operands."""
    low_precision = Precision(low_precision)
    if dtype == "float32":
        prec = Precision.TF32X3
    elif low_precision is Precision.BF16 and dtype != "bfloat16":
        prec = Precision.TF32
    else:
        prec = low_precision
    state_prec = Precision.TF32 if prec is Precision.F16 else prec
    pieces = 3 if prec in (Precision.TF32X3, Precision.IEEE) else 2
    return Precisions(prec=prec, state_prec=state_prec, mask_prec=Precision.BF16, pieces=pieces,
                      dg_pieces=1 if prec is Precision.BF16 else pieces,
                      states_dtype="bfloat16" if state_prec is Precision.BF16 else "float32")
