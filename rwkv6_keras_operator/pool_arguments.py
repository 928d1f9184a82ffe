"""Checking and normalising the arguments of `RWKVKernelOperator.step`: one token for rows whose states live in a pool.

As for the call (arguments.py), shapes and dtypes are checked once per signature. The values of `slots` (in range,
distinct) are checked whenever they are known: always for a list, tuple or NumPy array; for a backend tensor
outside jax.jit, tf.function, torch.compile and CUDA-graph capture, and only once for a tensor that has not changed
since it was last checked (a torch tensor's version counter tells), so a serving loop that keeps its slots on the
device forces no host synchronisation at each step.
"""
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from keras import ops

from .arguments import (MAX_PLANS, bonus, cached, check_bonus, check_channels, check_rkvw, dtype_name,
                        is_torch_tensor, key_shape, shape_of, to_tensor, torch_compiling, values_readable)


@dataclass(frozen=True)
class StepPlan:
    """What the checks of one signature of `step` found: r's shape ((B, C) or (B, 1, C)), H, N, u given as (C,), and
    the number of states in the pool."""

    shape: tuple
    heads: int
    head_size: int
    u_flat: bool
    pool_size: object

    @property
    def static(self):
        return None not in self.shape and self.pool_size is not None


class StepArgs(NamedTuple):
    """Engine-ready arguments of a pool step: r, k, v, w as given ((B, C) or (B, 1, C)); u (H, N) float32; the pool
    (n, H, N, N) float32; slots a backend integer tensor (B,)."""

    r: object
    k: object
    v: object
    w: object
    u: object
    pool: object
    slots: object
    plan: StepPlan


def _one_token(shape):
    return len(shape) == 2 or (len(shape) == 3 and shape[1] in (1, None))


def _check_tokens(head_size, tensors):
    shape = check_rkvw(tensors, _one_token, "(batch, channels) or (batch, 1, channels): one token a row")
    check_channels(shape[-1], head_size)
    return shape


def _check_pool(pool, H, N):
    expected = f"(n, {H}, {N}, {N})"
    if dtype_name(pool) != "float32":
        raise TypeError(f"`pool` must be a float32 tensor of shape {expected} (it is updated in place, never cast); "
                        f"got dtype {dtype_name(pool)}.")
    shape = shape_of(pool)
    if len(shape) != 4 or shape[1:] != (H, N, N):
        raise ValueError(f"`pool` must have shape {expected}: n states of {H} heads; got {shape}.")
    return shape[0]


def _check_slots_type(slots, B):
    if isinstance(slots, np.ndarray):
        if slots.dtype.kind not in "iu":
            raise TypeError(f"`slots` must hold integers; got dtype {slots.dtype}.")
    elif "int" not in dtype_name(slots):
        raise TypeError(f"`slots` must hold integers; got dtype {dtype_name(slots)}.")
    if len(slots.shape) != 1 or (B is not None and slots.shape[0] not in (None, B)):
        raise ValueError(f"`slots` must have shape ({B},) (the pool row of each batch row); got {shape_of(slots)}.")


def _make_plan(head_size, r, k, v, w, u, pool, slots):
    shape = _check_tokens(head_size, {"r": r, "k": k, "v": v, "w": w})
    H, N = shape[-1] // head_size, head_size
    u_flat = check_bonus(u, H, N)
    n = _check_pool(pool, H, N)
    _check_slots_type(slots, shape[0])
    return StepPlan(shape, H, N, u_flat, n)


def _signature(head_size, r, k, v, w, u, pool, slots):
    return ("step", head_size, key_shape(r), r.dtype, key_shape(k), k.dtype, key_shape(v), v.dtype, key_shape(w),
            w.dtype, key_shape(u), u.dtype, key_shape(pool), pool.dtype, type(slots), slots.dtype, key_shape(slots))


def check_slot_values(values, n):
    """values: NumPy ints. In [0, n) and distinct, or a ValueError that says which are not."""
    if values.size == 0:
        return
    lo, hi = values.min(), values.max()
    if lo < 0 or (n is not None and hi >= n):
        raise ValueError(f"`slots` values must lie in [0, {n}) (the pool holds {n} states); got values in "
                         f"[{lo}, {hi}].")
    found, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"`slots` must be distinct (each row advances a state of its own); got "
                         f"{found[counts > 1].tolist()} more than once.")


class _CheckedTensors:
    """Backend tensors whose slot values were checked, by identity: a tensor is checked again only when it changed
    (a torch tensor's in-place version counter; jax and tensorflow tensors never change) or the pool size did."""

    def __init__(self):
        self._seen = {}

    @staticmethod
    def _version(x):
        return getattr(x, "_version", None)

    def known(self, x, n):
        entry = self._seen.get(id(x))
        return entry is not None and entry[0]() is x and entry[1:] == (self._version(x), n)

    def add(self, x, n):
        try:
            ref = weakref.ref(x, lambda _, key=id(x): self._seen.pop(key, None))
        except TypeError:   # a tensor type without weak references: it is checked every call
            return
        self._seen[id(x)] = (ref, self._version(x), n)


_CHECKED = _CheckedTensors()


def _device_slots(slots, pool, n):
    """slots as a backend tensor on the pool's device, its values checked when known."""
    if isinstance(slots, np.ndarray):
        check_slot_values(slots, n)
        if is_torch_tensor(pool):
            import torch

            return torch.as_tensor(slots, device=pool.device)
        return to_tensor(slots.astype(np.int32))
    if values_readable(slots) and not _CHECKED.known(slots, n):
        check_slot_values(np.asarray(ops.convert_to_numpy(slots)), n)
        _CHECKED.add(slots, n)
    if is_torch_tensor(pool) and slots.device != pool.device:
        slots = slots.to(pool.device)
    return slots


_EAGER_PLANS = {}


def _eager_torch_plan(head_size, r, k, v, w, u, pool, slots):
    """The StepPlan of an eager torch call whose arguments are all tensors that need no conversion, or None (the full
    path). One key of every shape, dtype and device (and the pool's layout) looks it up; a new key's plan is made by
    the full path (every check, every error) once."""
    if not is_torch_tensor(r) or torch_compiling():
        return None
    try:
        key = (head_size, r.shape, r.dtype, r.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
               w.shape, w.dtype, w.device, u.shape, u.dtype, u.device, pool.shape, pool.dtype, pool.device,
               pool.is_contiguous(), slots.shape, slots.dtype, slots.device)
    except AttributeError:   # not tensors (lists, NumPy): converted on the full path
        return None
    found = _EAGER_PLANS.get(key)
    if found is None:
        if not all(is_torch_tensor(x) and to_tensor(x) is x for x in (r, k, v, w, u, pool, slots)):
            return None
        found = _prepare(head_size, r, k, v, w, u, pool, slots).plan
        if len(_EAGER_PLANS) >= MAX_PLANS:
            _EAGER_PLANS.clear()
        _EAGER_PLANS[key] = found
    return found


def prepare_step(head_size, r, k, v, w, u, pool, slots):
    """StepArgs of a call of `step`: every check of its signature (cached), the pool's layout and the slot values."""
    p = _eager_torch_plan(head_size, r, k, v, w, u, pool, slots)
    if p is not None:
        return StepArgs(r, k, v, w, bonus(p, u), pool, _device_slots(slots, pool, p.pool_size), p)
    return _prepare(head_size, r, k, v, w, u, pool, slots)


def _prepare(head_size, r, k, v, w, u, pool, slots):
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("pool", pool), ("slots", slots)):
        if x is None:
            raise TypeError(f"`{name}` is required; got None.")
    r, k, v, w = to_tensor(r), to_tensor(k), to_tensor(v), to_tensor(w)
    u = None if u is None else to_tensor(u)
    pool = to_tensor(pool)
    slots = np.asarray(slots) if isinstance(slots, (list, tuple, np.ndarray)) else to_tensor(slots)
    if u is None:
        p = _make_plan(head_size, r, k, v, w, u, pool, slots)
    else:
        p = cached(lambda: _signature(head_size, r, k, v, w, u, pool, slots),
                   lambda: _make_plan(head_size, r, k, v, w, u, pool, slots))
    if is_torch_tensor(pool):
        if pool.device != r.device:
            raise ValueError(f"`pool` must be on the device of `r` ({r.device}); got {pool.device}.")
        if not pool.is_contiguous():
            raise ValueError("`pool` must be contiguous: its rows are updated in place where they lie.")
    return StepArgs(r, k, v, w, bonus(p, u), pool, _device_slots(slots, pool, p.pool_size), p)
