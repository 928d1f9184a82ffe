"""Launch settings of the Triton engine: frozen dataclasses, passed explicitly from `binding.wkv` down to every launch
(as jax's Pallas ops pass their BlockSizes). `Settings()` is the default; a launch left None takes the rule below for
the call's shapes (head size N, rows times heads B * H, chunks NC). The rules and their defaults were chosen from
timings (benchmarks/RESULTS.md, benchmarks/notes_triton.md); `benchmarks/gpu_torch.py VARIANTS=1` times the
alternatives.
"""
import dataclasses
import functools
import json
from typing import Optional

from .. import shared


@dataclasses.dataclass(frozen=True)
class ForwardLaunch:
    """The forward chunk kernel (forward.py)."""
    block_v: int                # BV: value channels a program (N // BV programs a sub-block)
    num_warps: int
    maxnreg: Optional[int]      # registers a thread (None: the compiler's choice); fewer let more programs share an SM


@dataclasses.dataclass(frozen=True)
class BackwardLaunch:
    """The backward chunk kernel (backward.py)."""
    num_warps: int
    num_stages: int
    maxnreg: Optional[int]


@dataclasses.dataclass(frozen=True)
class ScanLaunch:
    """The state scan (scan.py): a program owns a block_k x block_v tile of one head's state."""
    block_k: int
    block_v: int
    num_warps: int
    num_stages: int


def forward_launch(N):
    """One program covers all value channels up to N = 64, under a cap of 128 registers a thread (one more program an
    SM); N = 128 splits the value channels in two."""
    return ForwardLaunch(N, 4, 128) if N <= 64 else ForwardLaunch(64, 8, None)


def backward_launch(N):
    return BackwardLaunch(4, 1, None) if N <= 64 else BackwardLaunch(8, 1, None)


def backward_split_launch(N):
    """(rows kernel, keys kernel) of the split backward (backward_split.py)."""
    return backward_launch(N), backward_launch(N)


def scan_regime(N, BH):
    """"many" (rows times heads enough for a program per tile of 32 key rows) or "few" (tiles of 16 key rows, and the
    segments of scan_segments add programs)."""
    return "many" if BH * max(N // 16, 1) >= 512 and N >= 32 else "few"


def scan_launch(N, BH):
    return ScanLaunch(min(N, 32 if scan_regime(N, BH) == "many" else 16), min(N, 64), 4, 3)


def scan_segments(NC, programs):
    """G: segments of chunks scanned at once (scan.py) where fewer than 128 programs would each walk the whole
    sequence: up to about 512 programs, each segment at least 32 chunks long. The fix-up after the segments reads
    and writes every stored state once more, which costs more than it saves where the programs are enough."""
    if programs >= 128:
        return 1
    return max(1, min(512 // programs, NC // 32))


@dataclasses.dataclass(frozen=True)
class Settings:
    chunk: int = 32                           # L: tokens a chunk (one stored state each)
    sub_block: int = 32                       # C: rows a sub-block (one binary tree of levels; sub_blocks.py)
    forward: Optional[ForwardLaunch] = None   # None: forward_launch(N)
    backward: Optional[BackwardLaunch] = None  # None: backward_launch(N)
    scan: Optional[ScanLaunch] = None         # None: scan_launch(N, B * H)
    segments: Optional[int] = None            # None: scan_segments(NC, programs)
    backward_split: bool = False              # the backward chunk kernel as two kernels, one a side of the pairs
                                              # (backward_split.py); `backward`, if given, launches both
    mask_table: bool = False                  # the chunk kernels load each level's 0/1 masks from a table written
                                              # once per device (masks.level_table) instead of building them

    def __post_init__(self):
        for name in ("chunk", "sub_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Settings.{name} must be a power of two >= 16 (the side of a tile product); "
                                 f"got {value!r}")
        if self.chunk % self.sub_block:
            raise ValueError(f"Settings.chunk ({self.chunk}) must be a multiple of sub_block ({self.sub_block})")
        if self.segments is not None and (not isinstance(self.segments, int) or self.segments < 1):
            raise ValueError(f"Settings.segments must be a positive int or None; got {self.segments!r}")
        for name in ("backward_split", "mask_table"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Settings.{name} must be a bool; got {getattr(self, name)!r}")
        # The settings as a string: a torch custom op takes tensors and scalars only, so the settings cross into
        # binding's ops as this string, which `from_key` reads back. Made once here, not at each call: a call under
        # torch.compile then reads a constant.
        object.__setattr__(self, "key", json.dumps(dataclasses.asdict(self), sort_keys=True))

    def chunk_length(self, T):
        """L for T tokens: `chunk`, or less for a short sequence, never less than one sub-block."""
        return shared.chunk_length(T, self.chunk, self.sub_block)

    def forward_for(self, N):
        return self.forward or forward_launch(N)

    def backward_for(self, N):
        return self.backward or backward_launch(N)

    def backward_split_for(self, N):
        """(rows kernel, keys kernel) launches of the split backward."""
        return (self.backward, self.backward) if self.backward else backward_split_launch(N)

    def scan_for(self, N, BH):
        return self.scan or scan_launch(N, BH)

    def segments_for(self, NC, programs):
        return max(1, min(self.segments, NC)) if self.segments is not None else scan_segments(NC, programs)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def from_key(key):
        fields = json.loads(key)
        for name, launch in (("forward", ForwardLaunch), ("backward", BackwardLaunch), ("scan", ScanLaunch)):
            if fields[name] is not None:
                fields[name] = launch(**fields[name])
        return Settings(**fields)
