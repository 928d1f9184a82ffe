"""Sequence parallelism under torch.distributed: one sequence cut along T across the ranks of a process group.

    y, state = sequence_parallel(op, r, k, v, w, u, group=None, init_state=None, with_state=False)

Each rank runs its own segment through the operator from a zero state (any engine: Triton on CUDA, the portable one
elsewhere), the ranks all-gather the pairs (log a, S_local) of segments.py (H·N + H·N² floats a row, whatever T is),
every rank finds its start state by the exclusive scan over ranks, and adds the start state's term to its outputs.
The backward runs the same exchange on the gradients of the start states and of the final state (dS flows from
later ranks to earlier ones), inside autograd: the engine's own backward does the rest. Works with NCCL (CUDA
tensors, each rank on its own device) and gloo (CPU tensors).
"""
import torch
import torch.distributed as dist
from keras import ops

from .segments import segment_log_decay, start_states, start_term


def sequence_parallel(op, r, k, v, w, u, group=None, init_state=None, with_state=False, check_shapes=True):
    """The operator's call on one sequence cut along T across the ranks of `group` (default: the whole world).

    Args:
        op: an RWKVKernelOperator (its head size gives H = C / N).
        r, k, v, w: (B, T_rank, C) torch tensors: this rank's consecutive slice of the time axis. Rank 0 holds the
            first tokens, rank 1 the next ones, and so on in rank order: that order is the caller's contract (it
            cannot be checked). Slices may have different lengths (at least one token each); B, C and the dtype
            must agree across ranks.
        u: (H, N) or (C,), the same on every rank.
        init_state: None, (H, N, N), (1, H, N, N) or (B, H, N, N): the state before the sequence's first token, the
            same on every rank (only rank 0's segment starts from it, but every rank needs it for the scan).
        with_state: also return the state after the sequence's last token (the same on every rank).
        check_shapes: all-gather the shapes first (a few ints) and raise a ValueError naming the ranks whose
            shapes differ, instead of a hang or a garbled exchange. One small collective a call.

    Returns y (B, T_rank, C) in r's dtype and, with_state=True, the float32 (B, H, N, N) final state, else None.

    Gradients are those of the sum of all ranks' losses (each rank calls backward on its own loss): r, k, v, w
    get this rank's slice of it; u and init_state the whole of it, the same on every rank (they are summed over
    the group inside the backward, so do not sum them again over this group).
    Every rank must call this function, in the same order as its other collectives on `group`.
    """
    if r.ndim != 3:
        raise ValueError(f"`r` must be (B, T, C) on each rank; got shape {tuple(r.shape)}.")
    B, T, C = r.shape
    N = op.head_size
    if T < 1 or C % N:
        raise ValueError(f"`r` (B, T, C) needs T >= 1 and C a multiple of head_size={N}; got {tuple(r.shape)}.")
    H = C // N
    s0 = _start_state(init_state, B, H, N, r.device)
    if check_shapes:
        _check_shapes(r, u, init_state, group)
    u = _SumGradient.apply(u, group)
    y_local, s_local = op(r, k, v, w, u, with_state=True)
    g, log_a = segment_log_decay(w.reshape(B, T, H, N))
    s_in, final = _Exchange.apply(log_a, s_local, s0, group)
    y = ops.cast(y_local, "float32") + ops.reshape(start_term(r.reshape(B, T, H, N), g, s_in), (B, T, C))
    return y.to(r.dtype), (final if with_state else None)


def _start_state(init_state, B, H, N, device):
    if init_state is None:
        return torch.zeros(B, H, N, N, dtype=torch.float32, device=device)
    shape = tuple(init_state.shape)
    if shape not in ((H, N, N), (1, H, N, N), (B, H, N, N)):
        raise ValueError(f"`init_state` must be (H, N, N), (1, H, N, N) or (B, H, N, N) = {(B, H, N, N)}; got "
                         f"{shape} (state_map is not taken here).")
    return init_state.float().reshape(-1, H, N, N).expand(B, H, N, N)


def _gather(x, group):
    """x from every rank of the group, stacked in rank order: (world, *x.shape)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _check_shapes(r, u, init_state, group):
    B, _, C = r.shape
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    dtype = dtypes.index(r.dtype) if r.dtype in dtypes else -1
    n_state = -1 if init_state is None else init_state.numel()
    mine = torch.tensor([B, C, dtype, u.numel(), n_state], dtype=torch.int64, device=r.device)
    every = _gather(mine, group).cpu()
    if not bool((every == every[0]).all()):
        names = ("B", "C", "dtype", "u size", "init_state size")
        rows = "; ".join(f"rank {i}: " + ", ".join(f"{n}={int(x)}" for n, x in zip(names, row))
                         for i, row in enumerate(every))
        raise ValueError("sequence_parallel: every rank must pass the same B, C, dtype, u and init_state (only T may "
                         f"differ); got {rows} (dtype codes: {[str(d) for d in dtypes]}).")


class _SumGradient(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the group: u is shared by every rank's segment."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Exchange(torch.autograd.Function):
    """(log a, S_local) of this rank, s0 -> this rank's start state and the final state, by an all-gather of the
    pairs. Backward: an all-gather of the gradients of every rank's start state and final state, then the scan's
    own backward (autograd through segments.start_states), each rank keeping its own part."""

    @staticmethod
    def forward(ctx, log_a, s_local, s0, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        n = log_a.numel()
        every = _gather(torch.cat([log_a.reshape(-1), s_local.reshape(-1)]).float(), group)
        log_a_all = every[:, :n].reshape(-1, *log_a.shape)
        local_all = every[:, n:].reshape(-1, *s_local.shape)
        starts, final = start_states(log_a_all, local_all, s0)
        ctx.save_for_backward(log_a_all, local_all, s0)
        return starts[ctx.rank], final

    @staticmethod
    def backward(ctx, d_start, d_final):
        log_a_all, local_all, s0 = ctx.saved_tensors
        d_start = torch.zeros_like(s0) if d_start is None else d_start
        d_final = torch.zeros_like(s0) if d_final is None else d_final
        n = d_start.numel()
        every = _gather(torch.cat([d_start.reshape(-1), d_final.reshape(-1)]).float(), ctx.group)
        d_starts = every[:, :n].reshape(-1, *s0.shape)
        d_final_sum = every[:, n:].reshape(-1, *s0.shape).sum(0)   # the final state of every rank's loss
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (log_a_all, local_all, s0)]
            starts, final = start_states(*leaves)
            d_log_a, d_local, d_s0 = torch.autograd.grad((starts, final), leaves, (d_starts, d_final_sum))
        return d_log_a[ctx.rank], d_local[ctx.rank], (d_s0 if ctx.needs_input_grad[2] else None), None
