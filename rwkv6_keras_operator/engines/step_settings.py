"""Launch geometry of the one-step kernels (decode and the state pool), shared by the Triton and Pallas engines.

A step reads each head's N x N float32 state once and writes it once; everything else it touches (r, k, v, w, u,
y) is N values a head. So a step is a copy of the state, and its speed is how close the kernel comes to the copy
bandwidth of the card: enough bytes in flight (many programs, wide contiguous loads) and every 128-byte line of
the state read and written whole by one program.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StepSettings:
    """How a step kernel cuts the states of B x H heads into programs.

    tile:       state elements a program moves, its N x BV tile: BV = min(N, tile // N) value columns, at least
                min_columns (pieces of BV * 4 bytes of each state row). 4096 gives N = 64 tiles of 64 x 64 (whole
                256-byte state rows, one program a head, 4 warps), the best geometry of both engines in the
                benchmark's sweep (benchmarks/serving.py --variants; numbers in benchmarks/RESULTS.md);
    min_columns: the fewest value columns a program takes (64-byte pieces of each row for large N);
    per_thread: state elements a thread holds: num_warps = N * BV / (32 * per_thread), between 1 and 8. 32 floats
                a thread are eight 16-byte loads in flight per thread, with registers to spare.
    """
    tile: int = 4096
    per_thread: int = 32
    min_columns: int = 16

    def columns(self, N):
        """BV, the value columns of one program's tile (a power of two dividing N)."""
        return min(N, max(self.tile // N, self.min_columns))

    def warps(self, N):
        return max(1, min(8, N * self.columns(N) // (32 * self.per_thread)))
