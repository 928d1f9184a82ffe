"""A state pool stepped in place: one token for the rows whose states are pool[slots] (RWKVKernelOperator.step).

The step kernel (recurrent.py) reads each row's state from the pool and writes the new one back to the same place,
so a step touches only the rows it advances: no gather or scatter copies, and the pool tensor passed in is the one
returned. Bound as a torch.library custom op that mutates the pool, so it also runs under torch.compile; eagerly the
implementation is called directly. It reads no value on the host (shapes alone decide the launch), so it can be
captured in a CUDA graph (with slots already on the GPU).
"""
import torch
from torch import Tensor

from .recurrent import launch_step, on_current_device


def pool_step_impl(r, k, v, w, u, pool, slots):
    r, k, v, w = r.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    u = (u if u.dtype == torch.float32 else u.float()).contiguous()
    slots = slots.contiguous()
    y = torch.empty_like(r)
    if on_current_device(r):
        launch_step(r, k, v, w, u, pool, y, pool, slots=slots)
    else:
        with torch.cuda.device(r.device):
            launch_step(r, k, v, w, u, pool, y, pool, slots=slots)
    return y


@torch.library.custom_op("rwkv6_triton::pool_step", mutates_args=("pool",))
def pool_step_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, pool: Tensor, slots: Tensor) -> Tensor:
    return pool_step_impl(r, k, v, w, u, pool, slots)


@pool_step_op.register_fake
def _pool_step_fake(r, k, v, w, u, pool, slots):
    return torch.empty_like(r)


def pool_step(r, k, v, w, u, pool, slots):
    """The engine protocol's pool_step: r, k, v, w (B, C) or (B, 1, C); u (H, N) float32; pool (n, H, N, N) float32,
    contiguous; slots (B,) ints on the pool's device, distinct. Returns y in r's shape and dtype, and the pool (the
    same tensor, rows `slots` advanced in place). No gradient is recorded (y comes from an empty tensor the kernel
    fills)."""
    if torch.compiler.is_compiling():
        return pool_step_op(r, k, v, w, u, pool, slots), pool
    return pool_step_impl(r, k, v, w, u, pool, slots), pool
