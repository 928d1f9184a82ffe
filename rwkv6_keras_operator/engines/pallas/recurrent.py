"""The step-by-step kernel for short sequences (decode: T = 1 with a carried state), and for a state pool.

One program per (value block, head, row) holds an N x BV block of the state in registers and walks the
tokens in order, exactly as the contract reads (docs/math.md, "The recurrence"):

    y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S[i, j]),   S[i, j] <- d_t[i] S[i, j] + k_t[i] v_t[j]

Element-wise float32 only (no matrix products), so it is exact for every input dtype.

The new state may be written over the old one (`in_place`: the state input aliases the state output, so XLA needs
no second buffer; inside a loop that carries the state, or with the state donated to a jitted step, it then
updates the state where it lies instead of copying it each step). Every program reads its block of the state before
it writes that same block, and no other program touches it, so this is safe. With `slots`, row b's state is
pool[slots[b]], read and written in place in a pool of any number of states (pool.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from ..step_settings import StepSettings
from . import common

# Value columns and warps of a program; programs run (value block, head, row) from fastest to slowest.
STEP = StepSettings()


def _step_kernel(*refs, T, BV, slots, u_rows):
    if slots:
        r_ref, k_ref, v_ref, w_ref, u_ref, s0_ref, slots_ref, y_ref, s1_ref = refs
    else:
        r_ref, k_ref, v_ref, w_ref, u_ref, s0_ref, y_ref, s1_ref = refs
    j, h, b = common.program_id(0), common.program_id(1), common.program_id(2)
    vcols = common.ds(j * BV, BV)
    u = common.load(u_ref.at[b, h, :] if u_rows else u_ref.at[h, :])[:, None]
    row = slots_ref[b] if slots else b

    def step(t, S):
        r = common.load(r_ref.at[b, t, h, :])[:, None]
        k = common.load(k_ref.at[b, t, h, :])[:, None]
        d = common.exp(common.log_decay(common.load(w_ref.at[b, t, h, :])))[:, None]
        v = common.load(v_ref.at[b, t, h, vcols])[None, :]
        kv = k * v
        common.store(y_ref.at[b, t, h, vcols], jnp.sum(r * (u * kv + S), axis=0))
        return d * S + kv

    S = lax.fori_loop(0, T, step, common.load(s0_ref.at[row, h, :, vcols]))
    common.store(s1_ref.at[row, h, :, vcols], S)


def _launch(r, k, v, w, u, states, *extra, in_place, slots, settings):
    settings = settings or STEP
    B, T, H, N = r.shape
    BV = settings.columns(N)
    kernel = functools.partial(_step_kernel, T=T, BV=BV, slots=slots, u_rows=u.ndim == 3)
    return common.call(
        kernel, grid=(N // BV, H, B), num_warps=settings.warps(N), num_stages=2, name="wkv6_recurrent",
        out_shape=(jax.ShapeDtypeStruct(r.shape, r.dtype), jax.ShapeDtypeStruct(states.shape, jnp.float32)),
        input_output_aliases={5: 1} if in_place else {},
    )(r, k, v, w, u, states, *extra)


def launch_step(r, k, v, w, u, s0, in_place=False, settings=None):
    """y (B, T, H, N) in r's dtype and the final state (B, H, N, N) float32; u (B, H, N) or (H, N); in_place: the
    state is written over s0 (see the module's docstring); settings: the launch geometry (default: STEP, read when
    the kernel is traced)."""
    return _launch(r, k, v, w, u, s0, in_place=in_place, slots=False, settings=settings)


def pool_step(r, k, v, w, u, pool, slots, settings=None):
    """One step (T = 1) of rows whose states are pool[slots]: y (B, 1, H, N) and the pool with those rows advanced,
    written in place (the pool input aliases the output). u: (H, N) float32; pool: (n, H, N, N) float32; slots:
    (B,) int32, distinct."""
    return _launch(r, k, v, w, u, pool, slots, in_place=True, slots=True, settings=settings)
