"""Sequence parallelism under jax: an engine's wkv made shardable along T (and rows and heads) under jax.jit.

`time_parallel(wkv, chunked=None)` wraps an engine's `wkv(r, k, v, w, u, s0) -> (y, state)` (r, k, v, w: (B, T, H,
N); u: (H, N); s0: (B, H, N, N) float32 or None) in `jax.experimental.custom_partitioning` ops joined by a
`jax.custom_vjp`. At partitioning time each op sees how its inputs are sharded:

* T not sharded: every device runs the engine on its own rows and heads (the rows and heads may be sharded; the
  other axes are gathered if they were).
* T sharded over a mesh axis (alone or with rows and heads): every device finds its segment's end state from a zero
  start as one product (segments.local_state), the devices all-gather the pairs (log a, S_local) of segments.py over
  that axis (H·N + H·N² floats a row: nothing of T's size), each one takes its start state from the exclusive scan
  over the axis, in mesh order, and runs the engine on its segment from that state. The final state (the last
  segment's end) is computed by every device from the same pairs.

Backward, for an engine that passes its chunked launchers (`chunked`, a ChunkedKernels: the Pallas engine): the
forward under differentiation also returns the engine's chunk states, in a layout sharded like T, rows and heads
(`_residual`), and the backward op runs the engine's own backward on them: with T not sharded exactly what the
unwrapped engine runs. With T sharded, each device adds the gradient of its start state from its own outputs
(segments.start_gradient), the devices all-gather those with log a, and a reverse scan over the axis gives each one
the gradient of its segment's end state (segments.end_gradients): the engine's backward from there is exact, with
nothing of T's size on the wire. A segment that is not a whole number of the engine's chunks has no chunk states of
the residual's layout: its backward runs the engine's state scan again from its start state (the outputs' kernel
is not run again).

Without `chunked` (the portable engine, differentiated by jax's autodiff) the backward is the vjp of the
per-device forward, which it recomputes: jax transposes the all-gather into a reduce-scatter of the pairs' gradients.

Wrapped only where jax has more than one device (engines/portable, engines/pallas): on one device the engine runs as
it is. On by default; RWKV6_TIME_SHARDING=0 (read at import) turns it off (see ENABLED).
"""
import functools
import math
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ..engines.pallas.sharding import rows_vmappable
from .segments import end_gradients, local_state, segment_log_decay, start_gradient, start_states

X4, U, S = "b t h n", "b h n", "b h n m"
RESIDUAL = "b h t q"   # the chunk states, laid out along T (_residual)
SHARDABLE = ("b", "t", "h")


class ChunkedKernels(NamedTuple):
    """An engine's chunked launchers, u given per row ((B, H, N) float32):

    chunk_length(T) -> L, the chunk length of a call on T tokens
    forward(r, k, v, w, u, s0, L) -> y, final state, states (B, H, nc, N, N): the state at every chunk start
    backward(r, k, v, w, u, states, dy, d_final, L) -> dr, dk, dv, dw, du (B, H, N), ds0
    scan(k, v, w, s0, L) -> states: forward's states alone"""
    chunk_length: Callable
    forward: Callable
    backward: Callable
    scan: Callable


def _mesh_axes(arg_shapes):
    """{factor: mesh axes} of the row, time and head axes, read from the first argument (r)."""
    spec = tuple(getattr(getattr(arg_shapes[0], "sharding", None), "spec", None) or ())
    spec = spec + (None,) * (4 - len(spec))
    return dict(zip("bth", spec[:3]))


def _axis_size(mesh, axes):
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[name] for name in names)


def _shardings(mesh, axes, layouts):
    return tuple(NamedSharding(mesh, PartitionSpec(*(axes.get(f) for f in layout.split()))) for layout in layouts)


def _start_state(k, v, g, log_a, s0, time_axis):
    """This device's start state and the state after the last segment, from the pairs of every segment (g, log a:
    segments.segment_log_decay of this segment's w)."""
    pairs = lax.all_gather(log_a, time_axis), lax.all_gather(local_state(k, v, g), time_axis)
    starts, final = start_states(*pairs, s0)
    return lax.dynamic_index_in_dim(starts, lax.axis_index(time_axis), keepdims=False), final


def _forward_program(wkv, time_axis):
    """The per-device forward: y and the final state of this device's rows, heads and segment."""
    def run(r, k, v, w, u_rows, s0):
        if time_axis is None:
            return wkv(r, k, v, w, u_rows[0], s0)
        s_in, final = _start_state(k, v, *segment_log_decay(w), s0, time_axis)
        y, _ = wkv(r, k, v, w, u_rows[0], s_in)
        return y, final
    return run


def _vjp_program(wkv, time_axis):
    """The per-device backward of an engine without chunked launchers: the vjp of the forward program. The final
    state is replicated over the time axis, its cotangent too: it enters once (on the axis' first device); u and
    s0, shared by every segment, sum their gradients over the axis."""
    forward = _forward_program(wkv, time_axis)

    def run(r, k, v, w, u_rows, s0, dy, d_final):
        _, pullback = jax.vjp(forward, r, k, v, w, u_rows, s0)
        if time_axis is not None:
            d_final = jnp.where(lax.axis_index(time_axis) == 0, d_final, jnp.zeros_like(d_final))
        dr, dk, dv, dw, du, ds0 = pullback((dy.astype(r.dtype), d_final))
        if time_axis is not None:
            du, ds0 = lax.psum(du, time_axis), lax.psum(ds0, time_axis)
        return dr, dk, dv, dw, du, ds0
    return run


def _residual_width(T, N, L):
    """q of the residual (B, H, T, q): the chunk states' N·N·nc values a row and head spread over T positions
    (N·N / L when L divides T), so that the residual shards along T like the inputs."""
    return -(-(-(-T // L) * N * N) // T)


def _residual(states, T, q):
    """(B, H, nc, N, N) chunk states -> (B, H, T, q), zero-padded (a reshape alone when nc·N·N = T·q)."""
    B, H = states.shape[:2]
    flat = states.reshape(B, H, -1)
    flat = jnp.pad(flat, ((0, 0), (0, 0), (0, T * q - flat.shape[2])))
    return flat.reshape(B, H, T, q)


def _chunk_states(residual, nc, N):
    B, H = residual.shape[:2]
    return residual.reshape(B, H, -1)[:, :, :nc * N * N].reshape(B, H, nc, N, N)


def _layout(kernels, T_global, T_local, N):
    """(L, q, whether this device's segment holds chunk states of the residual's layout)."""
    L = kernels.chunk_length(T_global)
    q = _residual_width(T_global, N, L)
    return L, q, T_local % L == 0 and (T_local // L) * N * N == T_local * q


def _chunked_forward_program(kernels, time_axis, T_global):
    """The per-device forward under differentiation: y, the final state and the chunk states as a residual."""
    def run(r, k, v, w, u_rows, s0):
        _, T, _, N = r.shape
        L, q, whole_chunks = _layout(kernels, T_global, T, N)
        s_in, final = (s0, None) if time_axis is None else _start_state(k, v, *segment_log_decay(w), s0, time_axis)
        y, last, states = kernels.forward(r, k, v, w, u_rows, s_in, L)
        if time_axis is None or whole_chunks:
            residual = _residual(states, T, q)
        else:   # the backward scans again: nothing to keep
            residual = jnp.zeros((*r.shape[:1], r.shape[2], T, q), states.dtype)
        return y, last if time_axis is None else final, residual
    return run


def _chunked_backward_program(kernels, time_axis, T_global):
    """The per-device backward of a chunked engine: the engine's own, given each segment's end-state gradient."""
    def run(r, k, v, w, u_rows, s0, residual, dy, d_final):
        _, T, _, N = r.shape
        L, _, whole_chunks = _layout(kernels, T_global, T, N)
        nc = -(-T // L)
        dy = dy.astype(r.dtype)
        if time_axis is None:
            return kernels.backward(r, k, v, w, u_rows, _chunk_states(residual, nc, N), dy, d_final, L)
        g, log_a = segment_log_decay(w)
        if whole_chunks:
            states = _chunk_states(residual, nc, N)
        else:
            states = kernels.scan(k, v, w, _start_state(k, v, g, log_a, s0, time_axis)[0], L)
        ends = end_gradients(lax.all_gather(log_a, time_axis),
                             lax.all_gather(start_gradient(r, g, dy), time_axis), d_final)
        first = lax.axis_index(time_axis) == 0
        d_end = lax.dynamic_index_in_dim(ends, lax.axis_index(time_axis), keepdims=False)
        dr, dk, dv, dw, du, ds_in = kernels.backward(r, k, v, w, u_rows, states, dy, d_end, L)
        ds0 = jnp.where(first, ds_in, jnp.zeros_like(ds_in))
        return dr, dk, dv, dw, lax.psum(du, time_axis), lax.psum(ds0, time_axis)
    return run


def _partitioned(program, in_layouts, out_layouts):
    """program(time axis, global T) -> the per-device function, as a custom_partitioning op; vmappable (every
    argument and result has a leading row axis)."""
    def unsharded(*args):
        return program(None, args[0].shape[1])(*args)

    def partition(mesh, arg_shapes, result_shape):
        axes = _mesh_axes(arg_shapes)
        return (mesh, program(axes["t"], arg_shapes[0].shape[1]), _shardings(mesh, axes, out_layouts),
                _shardings(mesh, axes, in_layouts))

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, _mesh_axes(arg_shapes), out_layouts)

    op = custom_partitioning(unsharded)
    factors = []   # in order of first appearance: Shardy wants the special factors sorted that way
    for layout in in_layouts + out_layouts:
        factors += [f for f in layout.split() if f not in factors]
    op.def_partition(partition, infer_sharding_from_operands=infer, propagate_user_sharding=None,
                     sharding_rule=f"{', '.join(in_layouts)} -> {', '.join(out_layouts)}",
                     need_replication_factors=tuple(f for f in factors if f not in SHARDABLE))
    return rows_vmappable(op)


def time_parallel(wkv, chunked=None):
    """wkv(r, k, v, w, u, s0) -> (y, state) of an engine, made shardable along T, rows and heads under jax.jit.
    chunked: the engine's ChunkedKernels, whose backward then runs on the forward's chunk states; None: the
    backward recomputes the forward under jax's autodiff."""
    inputs = (X4, X4, X4, X4, U, S)
    forward_op = _partitioned(lambda axis, T: _forward_program(wkv, axis), inputs, (X4, S))
    if chunked is None:
        forward_res_op = forward_op
        backward_op = _partitioned(lambda axis, T: _vjp_program(wkv, axis), inputs + (X4, S), inputs)
    else:
        forward_res_op = _partitioned(functools.partial(_chunked_forward_program, chunked), inputs,
                                      (X4, S, RESIDUAL))
        backward_op = _partitioned(functools.partial(_chunked_backward_program, chunked),
                                   inputs + (RESIDUAL, X4, S), inputs)

    @jax.custom_vjp
    def run(r, k, v, w, u_rows, s0):
        return tuple(forward_op(r, k, v, w, u_rows, s0))

    def run_fwd(r, k, v, w, u_rows, s0):
        y, final, *residual = forward_res_op(r, k, v, w, u_rows, s0)
        return (y, final), (r, k, v, w, u_rows, s0, *residual)

    def run_bwd(residuals, cotangents):
        dy, d_final = cotangents
        return tuple(backward_op(*residuals, dy, d_final.astype(jnp.float32)))

    run.defvjp(run_fwd, run_bwd)

    @functools.wraps(wkv)
    def wrapped(r, k, v, w, u, s0):
        B, T, H, N = r.shape
        u_rows = jnp.broadcast_to(jnp.asarray(u, jnp.float32)[None], (B, H, N))   # du per row: summed by XLA
        s0 = jnp.zeros((B, H, N, N), jnp.float32) if s0 is None else jnp.asarray(s0, jnp.float32)
        return run(r, k, v, w, u_rows, s0)

    return wrapped


# RWKV6_TIME_SHARDING=0 (read at import) leaves the engines unwrapped: inputs sharded along T are then gathered
# (correct, and the exchange is T-sized). On by default: wrapped, the Pallas engine's training costs what it costs
# unwrapped where T is not sharded; the portable engine's backward recomputes each device's forward.
ENABLED = os.environ.get("RWKV6_TIME_SHARDING", "1").strip().lower() not in ("0", "false", "no", "off")


def time_sharding():
    """Whether the engines take inputs sharded along T: enabled, and jax has more than one device (only then can an
    input be sharded; checked at trace time)."""
    return ENABLED and jax.device_count() > 1
