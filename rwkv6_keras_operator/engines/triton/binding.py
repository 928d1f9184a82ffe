"""The Triton kernels as torch.library custom ops, with fake (meta) implementations and registered autograd, so
the engine runs in eager mode, under torch.compile(fullgraph=True) and inside CUDA-graph capture (no host sync
anywhere: shapes alone decide every launch).

    rwkv6_triton::forward(r, k, v, w, u, s0?, settings) -> (y, state, states)
    rwkv6_triton::backward(r, k, v, w, u, s0?, states, dy, dstate?, settings) -> (dr, dk, dv, dw, du, ds0)

`states` holds the start state of chunks 1 .. NC-1 (B, H, NC-1, N, N): with the inputs, all the forward saves for
the backward (the start of chunk 0 is s0 itself), in `states_dtype` (shared.Precisions.states_dtype).
T == 1 runs the one-step kernel (decode). `settings` is a settings.Settings as its key string (an op takes tensors
and scalars only).

Packed sequences (cu_seqlens, B == 1; docs/math.md "Packed sequences", the chunks re-cut per sequence):

    rwkv6_triton::forward_varlen(r, k, v, w, u, s0?, cu_seqlens, settings) -> (y, finals, states, chunks, sequences)
    rwkv6_triton::backward_varlen(r, k, v, w, u, chunks, sequences, states, dy, dfinals?, has_s0, settings)
        -> (dr, dk, dv, dw, du, ds0)

`chunks`, `sequences`: the common.Varlen of cu_seqlens (varlen.varlen_tables, on the device: no host sync), saved
for the backward with `states` (1, H, NC, N, N), the start state of every chunk; s0 and finals (n, H, N, N), one
per sequence.
"""
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import packed, shared
from ..shared import Precision
from .backward import launch_backward
from .common import Varlen
from .forward import launch_forward
from .recurrent import launch_step, step
from .scan import launch_scan
from .settings import Settings
from .varlen import varlen_tables


def precisions(x):
    """The shared.Precisions of the kernels for x's dtype. Under the Triton interpreter (CPU tensors) every product is
    an IEEE float32 product: its bfloat16 tl.dot is unreliable, and the pieces' values are bfloat16 either way; the
    stored chunk states keep the compiled kernels' dtype."""
    p = shared.precisions(str(x.dtype).replace("torch.", ""))
    if not x.is_cuda:
        p = dataclasses.replace(p, prec=Precision.IEEE, state_prec=Precision.IEEE, mask_prec=Precision.IEEE)
    return p


def states_dtype(x):
    """torch dtype of the chunk states stored for inputs like x (shared.Precisions.states_dtype)."""
    return getattr(torch, precisions(x).states_dtype)


def _device(x):
    return torch.cuda.device(x.device) if x.is_cuda else _NoDevice()


class _NoDevice:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def n_chunks(T, settings):
    """NC, the chunks of a sequence of T tokens."""
    return -(-T // settings.chunk_length(T))


def forward_impl(r, k, v, w, u, s0, settings):
    B, T, H, N = r.shape
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    u = u.to(torch.float32).contiguous()
    s0 = None if s0 is None else s0.to(torch.float32).contiguous()
    y = torch.empty(r.shape, dtype=r.dtype, device=r.device)
    state = torch.empty((B, H, N, N), dtype=torch.float32, device=r.device)
    states = torch.empty((B, H, n_chunks(T, settings) - 1, N, N), dtype=states_dtype(r), device=r.device)
    with _device(r):
        if T == 1:
            launch_step(r, k, v, w, u, s0, y, state)
        else:
            p, L = precisions(r), settings.chunk_length(T)
            launch_scan(k, v, w, s0, state, states, False, p, settings, L)
            launch_forward(r, k, v, w, u, s0, states, y, p, settings, L)
    return y, state, states


def backward_impl(r, k, v, w, u, s0, states, dy, dstate, settings):
    B, T, H, N = r.shape
    L, C = settings.chunk_length(T), settings.sub_block
    NC = -(-T // L)
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    u = u.to(torch.float32).contiguous()
    s0 = None if s0 is None else s0.to(torch.float32).contiguous()
    dy = dy.to(r.dtype).contiguous()
    dstate = None if dstate is None else dstate.to(torch.float32).contiguous()
    dev = r.device
    dstates = torch.empty((B, H, NC, N, N), dtype=states_dtype(r), device=dev)
    ds0 = torch.empty((B, H, N, N) if s0 is not None else (0,), dtype=torch.float32, device=dev)
    dr, dk, dv, dw = (torch.empty(r.shape, dtype=r.dtype, device=dev) for _ in range(4))
    du_part = torch.empty((B, H, NC * (L // C), N), dtype=torch.float32, device=dev)   # one row a program
    p = precisions(r)
    with _device(r):
        launch_scan(r, dy, w, dstate, ds0 if s0 is not None else None, dstates, True, p, settings, L)
        launch_backward(r, k, v, w, u, s0, states, dstates, dy, dr, dk, dv, dw, du_part, p, settings, L)
    return dr, dk, dv, dw, du_part.sum((0, 2)), ds0


@torch.library.custom_op("rwkv6_triton::forward", mutates_args=())
def forward_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Optional[Tensor],
               settings: str) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(r, k, v, w, u, s0, Settings.from_key(settings))


@forward_op.register_fake
def _forward_fake(r, k, v, w, u, s0, settings):
    B, T, H, N = r.shape
    return (r.new_empty(r.shape), r.new_empty((B, H, N, N), dtype=torch.float32),
            r.new_empty((B, H, n_chunks(T, Settings.from_key(settings)) - 1, N, N), dtype=states_dtype(r)))


@torch.library.custom_op("rwkv6_triton::backward", mutates_args=())
def backward_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Optional[Tensor], states: Tensor,
                dy: Tensor, dstate: Optional[Tensor], settings: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_impl(r, k, v, w, u, s0, states, dy, dstate, Settings.from_key(settings))


@backward_op.register_fake
def _backward_fake(r, k, v, w, u, s0, states, dy, dstate, settings):
    B, T, H, N = r.shape
    ds0 = r.new_empty((B, H, N, N) if s0 is not None else (0,), dtype=torch.float32)
    return (r.new_empty(r.shape), r.new_empty(r.shape), r.new_empty(r.shape), r.new_empty(r.shape),
            u.new_empty((H, N), dtype=torch.float32), ds0)


def _setup_context(ctx, inputs, output):
    r, k, v, w, u, s0, settings = inputs
    # Outputs nobody differentiated (the final state, usually; the saved states, always) get None, not zeros: zeros
    # would cost a memset of every chunk state (537 MB at B=8, T=4096, H=32) for nothing.
    ctx.set_materialize_grads(False)
    ctx.has_s0 = s0 is not None
    ctx.settings = settings
    ctx.save_for_backward(r, k, v, w, u, s0, output[2])
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, dstate, _dstates):
    r, k, v, w, u, s0, states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(r)
    dr, dk, dv, dw, du, ds0 = backward_op(r, k, v, w, u, s0, states, dy, dstate, ctx.settings)
    return dr, dk, dv, dw, du.to(u.dtype), (ds0 if ctx.has_s0 else None), None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def _needs_graph(r, k, v, w, u, s0):
    """The call must go through the custom op: traced by torch.compile, or differentiated."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
        r.requires_grad or k.requires_grad or v.requires_grad or w.requires_grad or u.requires_grad
        or (s0 is not None and s0.requires_grad)))


def wkv(r, k, v, w, u, s0=None, settings=Settings()):
    """(y, state): the engine protocol's wkv on torch tensors (B, T, H, N); u (H, N); s0 (B, H, N, N) or None;
    settings: the kernels' launch settings (settings.Settings)."""
    if _needs_graph(r, k, v, w, u, s0):
        y, state, _ = forward_op(r, k, v, w, u, s0, settings.key)
    elif r.shape[1] == 1:  # eager decode: the step alone (no chunk states to allocate)
        y, state = step(r, k, v, w, u, s0)
    else:  # eager inference: the same implementation without the dispatcher's overhead
        y, state, _ = forward_impl(r, k, v, w, u, s0, settings)
    return y, state


def decode(r, k, v, w, u, s0=None, settings=Settings()):
    """The engine protocol's decode: one token on (B, 1, C) tensors, the heads given by u (H, N); y (B, 1, C)."""
    if _needs_graph(r, k, v, w, u, s0):
        B, T, C = r.shape
        H, N = u.shape
        y, state = wkv(*(x.reshape(B, T, H, N) for x in (r, k, v, w)), u, s0, settings)
        return y.reshape(B, T, C), state
    return step(r, k, v, w, u, s0)


# ---------------------------------------------------------------------------------------------- packed sequences
def forward_varlen_impl(r, k, v, w, u, s0, cu_seqlens, settings):
    _, T, H, N = r.shape
    n = cu_seqlens.shape[0] - 1
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    u = u.to(torch.float32).contiguous()
    s0 = None if s0 is None else s0.to(torch.float32).contiguous()
    p, L = precisions(r), settings.chunk_length(T)
    y = torch.empty(r.shape, dtype=r.dtype, device=r.device)
    finals = torch.empty((n, H, N, N), dtype=torch.float32, device=r.device)
    with _device(r):
        varlen = varlen_tables(cu_seqlens, T, L)
        states = torch.empty((1, H, varlen.chunks.shape[0], N, N), dtype=states_dtype(r), device=r.device)
        launch_scan(k, v, w, s0, finals, states, False, p, settings, L, varlen)
        launch_forward(r, k, v, w, u, None, states, y, p, settings, L, varlen)
    return y, finals, states, varlen.chunks, varlen.sequences


def backward_varlen_impl(r, k, v, w, u, chunks, sequences, states, dy, dfinals, has_s0, settings):
    _, T, H, N = r.shape
    n, NC = sequences.shape[0], chunks.shape[0]
    L, C = settings.chunk_length(T), settings.sub_block
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    u = u.to(torch.float32).contiguous()
    dy = dy.to(r.dtype).contiguous()
    dfinals = None if dfinals is None else dfinals.to(torch.float32).contiguous()
    dev = r.device
    varlen = Varlen(chunks, sequences)
    dstates = torch.empty((1, H, NC, N, N), dtype=states_dtype(r), device=dev)
    ds0 = torch.empty((n, H, N, N) if has_s0 else (0,), dtype=torch.float32, device=dev)
    dr, dk, dv, dw = (torch.empty(r.shape, dtype=r.dtype, device=dev) for _ in range(4))
    # one row a program; zeros: the programs of the unused chunks return before they write theirs
    du_part = torch.zeros((1, H, NC * (L // C), N), dtype=torch.float32, device=dev)
    p = precisions(r)
    with _device(r):
        launch_scan(r, dy, w, dfinals, ds0 if has_s0 else None, dstates, True, p, settings, L, varlen)
        launch_backward(r, k, v, w, u, None, states, dstates, dy, dr, dk, dv, dw, du_part, p, settings, L, varlen)
    return dr, dk, dv, dw, du_part.sum((0, 2)), ds0


@torch.library.custom_op("rwkv6_triton::forward_varlen", mutates_args=())
def forward_varlen_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Optional[Tensor], cu_seqlens: Tensor,
                      settings: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return forward_varlen_impl(r, k, v, w, u, s0, cu_seqlens, Settings.from_key(settings))


@forward_varlen_op.register_fake
def _forward_varlen_fake(r, k, v, w, u, s0, cu_seqlens, settings):
    _, T, H, N = r.shape
    n = cu_seqlens.shape[0] - 1
    NC = packed.max_chunks(T, n, Settings.from_key(settings).chunk_length(T))
    return (r.new_empty(r.shape), r.new_empty((n, H, N, N), dtype=torch.float32),
            r.new_empty((1, H, NC, N, N), dtype=states_dtype(r)), r.new_empty((NC, 4), dtype=torch.int32),
            r.new_empty((n, 2), dtype=torch.int32))


@torch.library.custom_op("rwkv6_triton::backward_varlen", mutates_args=())
def backward_varlen_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, chunks: Tensor, sequences: Tensor,
                       states: Tensor, dy: Tensor, dfinals: Optional[Tensor], has_s0: bool, settings: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_varlen_impl(r, k, v, w, u, chunks, sequences, states, dy, dfinals, has_s0,
                                Settings.from_key(settings))


@backward_varlen_op.register_fake
def _backward_varlen_fake(r, k, v, w, u, chunks, sequences, states, dy, dfinals, has_s0, settings):
    _, T, H, N = r.shape
    ds0 = r.new_empty((sequences.shape[0], H, N, N) if has_s0 else (0,), dtype=torch.float32)
    return (r.new_empty(r.shape), r.new_empty(r.shape), r.new_empty(r.shape), r.new_empty(r.shape),
            u.new_empty((H, N), dtype=torch.float32), ds0)


def _setup_varlen_context(ctx, inputs, output):
    r, k, v, w, u, s0, cu_seqlens, settings = inputs
    ctx.set_materialize_grads(False)   # as _setup_context
    ctx.has_s0 = s0 is not None
    ctx.settings = settings
    states, chunks, sequences = output[2:]
    ctx.save_for_backward(r, k, v, w, u, chunks, sequences, states)
    ctx.mark_non_differentiable(states, chunks, sequences)


def _backward_varlen(ctx, dy, dfinals, _dstates, _chunks, _sequences):
    r, k, v, w, u, chunks, sequences, states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(r)
    dr, dk, dv, dw, du, ds0 = backward_varlen_op(r, k, v, w, u, chunks, sequences, states, dy, dfinals,
                                                 ctx.has_s0, ctx.settings)
    return dr, dk, dv, dw, du.to(u.dtype), (ds0 if ctx.has_s0 else None), None, None


forward_varlen_op.register_autograd(_backward_varlen, setup_context=_setup_varlen_context)


def wkv_varlen(r, k, v, w, u, s0, cu_seqlens, settings=Settings()):
    """(y, finals): the engine protocol's wkv_varlen. r, k, v, w (1, T, H, N); u (H, N); s0 (n, H, N, N) or None;
    cu_seqlens (n + 1,) int tensor on r's device (checked by the caller); finals (n, H, N, N) float32."""
    if _needs_graph(r, k, v, w, u, s0):
        y, finals = forward_varlen_op(r, k, v, w, u, s0, cu_seqlens, settings.key)[:2]
    else:
        y, finals = forward_varlen_impl(r, k, v, w, u, s0, cu_seqlens, settings)[:2]
    return y, finals
