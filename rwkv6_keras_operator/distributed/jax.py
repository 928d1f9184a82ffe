"""Sequence parallelism under jax: an engine's wkv made shardable along T (and rows and heads) under jax.jit.

`time_parallel(wkv)` wraps an engine's `wkv(r, k, v, w, u, s0) -> (y, state)` (r, k, v, w: (B, T, H, N); u: (H, N);
s0: (B, H, N, N) float32 or None) in `jax.experimental.custom_partitioning`, forward and backward each, joined by a
`jax.custom_vjp`. At partitioning time each op sees how its inputs are sharded:

* T not sharded: every device runs wkv on its own rows and heads (the rows and heads may be sharded; the other
  axes are gathered if they were).
* T sharded over a mesh axis (alone or with rows and heads): every device runs wkv on its own segment from a zero
  state, the devices all-gather the pairs (log a, S_local) of segments.py over that axis (H·N + H·N² floats a row:
  nothing of T's size), each one takes its start state from the exclusive scan over the axis, in mesh order, and
  adds the start state's term to its outputs. The final state (the last segment's end) is computed by every device
  from the same pairs. The backward is the vjp of that per-device program: jax transposes the all-gather into a
  reduce-scatter of the pairs' gradients, so the gradient of each start state flows back from the later devices to
  the earlier ones, again with nothing of T's size on the wire.

The backward recomputes the forward on each device (the custom_vjp keeps the inputs only: what an engine keeps
between its own forward and backward has no sharded global shape that both partitionings could agree on before
jax knows how T is cut). Wrapped only where jax has more than one device (engines/portable, engines/pallas): on
one device the engine runs as it is. Opt-in: RWKV6_TIME_SHARDING=1 (see ENABLED).
"""
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from .segments import segment_log_decay, start_states, start_term

X4, U, S = "b t h n", "b h n", "b h n m"
SHARDABLE = ("b", "t", "h")


def _mesh_axes(arg_shapes):
    """{factor: mesh axes} of the row, time and head axes, read from the first argument (r)."""
    spec = tuple(getattr(getattr(arg_shapes[0], "sharding", None), "spec", None) or ())
    spec = spec + (None,) * (4 - len(spec))
    return dict(zip("bth", spec[:3]))


def _shardings(mesh, axes, layouts):
    return tuple(NamedSharding(mesh, PartitionSpec(*(axes.get(f) for f in layout.split()))) for layout in layouts)


def _segment_program(wkv, time_axis):
    """The per-device forward: y and the final state of this device's rows, heads and segment."""
    def run(r, k, v, w, u_rows, s0):
        u = u_rows[0]
        if time_axis is None:
            return wkv(r, k, v, w, u, s0)
        y_local, s_local = wkv(r, k, v, w, u, jnp.zeros_like(s0))
        g, log_a = segment_log_decay(w)
        starts, final = start_states(lax.all_gather(log_a, time_axis), lax.all_gather(s_local, time_axis), s0)
        s_in = lax.dynamic_index_in_dim(starts, lax.axis_index(time_axis), keepdims=False)
        y = y_local.astype(jnp.float32) + start_term(r, g, s_in)
        return y.astype(r.dtype), final
    return run


def _backward_program(wkv, time_axis):
    """The per-device backward: the vjp of the forward program. The final state is replicated over the time axis,
    its cotangent too: it enters once (on the axis' first device); u and s0, shared by every segment, sum their
    gradients over the axis."""
    forward = _segment_program(wkv, time_axis)

    def run(r, k, v, w, u_rows, s0, dy, d_final):
        _, pullback = jax.vjp(forward, r, k, v, w, u_rows, s0)
        if time_axis is not None:
            d_final = jnp.where(lax.axis_index(time_axis) == 0, d_final, jnp.zeros_like(d_final))
        dr, dk, dv, dw, du, ds0 = pullback((dy.astype(r.dtype), d_final))
        if time_axis is not None:
            du, ds0 = lax.psum(du, time_axis), lax.psum(ds0, time_axis)
        return dr, dk, dv, dw, du, ds0
    return run


def _partitioned(program, in_layouts, out_layouts):
    """program(wkv-independent factory of the per-device function, given the time axis) as a custom_partitioning op."""
    def per_device(time_axis):
        return program(time_axis)

    def unsharded(*args):
        return per_device(None)(*args)

    def partition(mesh, arg_shapes, result_shape):
        axes = _mesh_axes(arg_shapes)
        return (mesh, per_device(axes["t"]), _shardings(mesh, axes, out_layouts),
                _shardings(mesh, axes, in_layouts))

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, _mesh_axes(arg_shapes), out_layouts)

    op = custom_partitioning(unsharded)
    factors = []
    for layout in in_layouts + out_layouts:
        factors += [f for f in layout.split() if f not in factors]
    op.def_partition(partition, infer_sharding_from_operands=infer, propagate_user_sharding=None,
                     sharding_rule=f"{', '.join(in_layouts)} -> {', '.join(out_layouts)}",
                     need_replication_factors=tuple(f for f in factors if f not in SHARDABLE))
    return op


def time_parallel(wkv):
    """wkv(r, k, v, w, u, s0) -> (y, state) of an engine, made shardable along T, rows and heads under jax.jit."""
    forward_op = _partitioned(lambda axis: _segment_program(wkv, axis), (X4, X4, X4, X4, U, S), (X4, S))
    backward_op = _partitioned(lambda axis: _backward_program(wkv, axis), (X4, X4, X4, X4, U, S, X4, S),
                               (X4, X4, X4, X4, U, S))

    @jax.custom_vjp
    def run(r, k, v, w, u_rows, s0):
        return forward_op(r, k, v, w, u_rows, s0)

    def run_fwd(r, k, v, w, u_rows, s0):
        return forward_op(r, k, v, w, u_rows, s0), (r, k, v, w, u_rows, s0)

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


# RWKV6_TIME_SHARDING=1 (read at import) wraps the engines. Off by default: the wrapper's backward recomputes each
# device's forward, also for inputs sharded over rows or heads only, where the engine's own backward would reuse the
# chunk states of its forward. Unwrapped, inputs sharded along T are gathered (correct, and the exchange is T-sized).
ENABLED = os.environ.get("RWKV6_TIME_SHARDING", "0").strip().lower() in ("1", "true", "yes", "on")


def time_sharding():
    """Whether the engines take inputs sharded along T: enabled, and jax has more than one device (only then can an
    input be sharded; checked at trace time)."""
    return ENABLED and jax.device_count() > 1
