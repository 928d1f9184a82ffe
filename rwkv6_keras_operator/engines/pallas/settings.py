"""Settings of the Pallas engine: one frozen dataclass, passed explicitly from `binding.wkv` (a static argument of its
jit, so other settings trace other programs) down to every launch, as jax's Pallas ops pass their BlockSizes. The
defaults were chosen from the compiled kernels' register and spill reports and from timings (benchmarks/RESULTS.md,
benchmarks/notes_pallas.md); `benchmarks/gpu_jax.py` times the alternatives (VARIANTS).
"""
import dataclasses

from .. import shared
from ..shared import Precision


@dataclasses.dataclass(frozen=True)
class Settings:
    chunk: int = 32                      # L: a power of two >= 16; a shorter sequence takes the power of two >= T
    low_precision: Precision = Precision.BF16   # the products of 16-bit inputs (shared.precisions)
    decode_max_t: int = 16               # sequences up to this length run recurrent.py when no gradient is taken
    # the chunk kernels: num_warps for N <= 64 and 16-bit inputs; larger tiles take at least 8 (chunk_warps)
    forward_warps: int = 4
    forward_stages: int = 2
    backward_warps: int = 4
    # the state scan (scan.py): the fused kernel builds each chunk's state terms as it goes, with key blocks of
    # state_scan_keys rows (each program builds the decays of its own keys) and value blocks of state_scan_block
    # columns; with fewer programs than state_scan_narrow_below the key blocks narrow to state_scan_keys_few rows;
    # with fewer than state_scan_min_programs the terms are built in parallel first (state_terms), then scan_terms
    # carries the state through them
    state_scan_keys: int = 32
    state_scan_block: int = 64
    state_scan_warps: int = 4
    state_scan_stages: int = 3           # software-pipeline stages of its loop over chunks
    state_scan_narrow_below: int = 512
    state_scan_keys_few: int = 16
    state_scan_min_programs: int = 128
    state_terms_warps: int = 4
    scan_terms_block: int = 32           # value columns a scan_terms program
    scan_terms_warps: int = 4
    # the chunk kernels load each level's 0/1 masks from a table (masks.level_table) instead of building them
    mask_table: bool = False

    def __post_init__(self):
        object.__setattr__(self, "low_precision", Precision(self.low_precision))   # a Precision or its value
        if not isinstance(self.chunk, int) or self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"Settings.chunk must be a power of two >= 16 (the side of a tile product); "
                             f"got {self.chunk!r}")
        if not isinstance(self.mask_table, bool):
            raise ValueError(f"Settings.mask_table must be a bool; got {self.mask_table!r}")

    def chunk_length(self, T):
        """L for T tokens: `chunk`, or the power of two >= T for a shorter sequence, at least 16 (the smallest side
        of a tile product)."""
        return shared.chunk_length(T, self.chunk, 16)

    def chunk_warps(self, warps, N, dtype):
        """num_warps of a chunk kernel: `warps` (one of the *_warps fields) for N <= 64 and 16-bit inputs, where it was
        chosen; larger tiles (float32 operands, N = 128, 256) keep at least 8, which the compiled kernels need to
        stay clear of heavy register spills."""
        import jax.numpy as jnp

        if N <= 64 and jnp.dtype(dtype) != jnp.float32:
            return warps
        return max(warps, 8)
