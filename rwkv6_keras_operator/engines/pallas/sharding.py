"""Row- and head-parallel ops: vmap and SPMD partitioning for the kernel launchers.

Every launcher of this engine maps independent (row b, head h) pairs: each input and output has a leading
row axis and a head axis (`layout` strings below, e.g. "b t h n"), and nothing mixes rows or heads. Two
wrappers make such a function behave like a plain jax op:

* `jax.custom_batching.custom_vmap`: under vmap the extra axis is folded into the row axis (an unbatched
  argument is broadcast first), so any number of leading axes work with one kernel launch.
* `jax.experimental.custom_partitioning`: under jit on inputs sharded over rows and/or heads, each device
  runs the kernels on its own rows/heads; every other axis (time, channels, chunks) is gathered if it
  was sharded. Inside shard_map (all mesh axes manual) and on one device it is the plain function.
  Rules are given both for Shardy (`sharding_rule`) and for the older GSPMD propagation.
"""
import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

PARALLEL = ("b", "h")


def _fold(x, batched, size):
    """(size, B, ...) -> (size * B, ...); an unbatched x is broadcast to the vmapped size first."""
    if not batched:
        x = jnp.broadcast_to(x, (size, *x.shape))
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _specs(arg_shapes, in_layouts):
    """Mesh axes of the row and head factors, taken from the first argument that has each factor."""
    found = {}
    for shape, layout in zip(arg_shapes, in_layouts):
        sharding = getattr(shape, "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is None:
            continue
        for factor, axes in zip(layout.split(), tuple(spec) + (None,) * len(layout.split())):
            if factor in PARALLEL and factor not in found:
                found[factor] = axes
    return found


def _sharding(mesh, layout, found):
    return NamedSharding(mesh, PartitionSpec(*(found.get(f) if f in PARALLEL else None for f in layout.split())))


def parallel_op(fn, in_layouts, out_layouts):
    """fn(*arrays) -> tuple of arrays, with the axes named by the layouts, as a vmappable, shardable op."""
    in_layouts, out_layouts = tuple(in_layouts), tuple(out_layouts)

    def positional(*args):   # custom_partitioning binds arguments by signature: no keywords
        return fn(*args)

    def shardings(mesh, arg_shapes):
        found = _specs(arg_shapes, in_layouts)
        ins = tuple(_sharding(mesh, layout, found) for layout in in_layouts)
        outs = tuple(_sharding(mesh, layout, found) for layout in out_layouts)
        return ins, outs

    def partition(mesh, arg_shapes, result_shape):
        ins, outs = shardings(mesh, arg_shapes)
        return mesh, positional, outs, ins

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    sharded = custom_partitioning(positional)
    factors = []   # in order of first appearance: Shardy wants the special factors sorted that way
    for layout in in_layouts + out_layouts:
        factors += [f for f in layout.split() if f not in factors]
    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        propagate_user_sharding=None,
        sharding_rule=f"{', '.join(in_layouts)} -> {', '.join(out_layouts)}",
        need_replication_factors=tuple(f for f in factors if f not in PARALLEL),
    )

    return rows_vmappable(sharded)


def rows_vmappable(fn):
    """fn(*arrays) -> tuple of arrays, every one with a leading row axis and rows independent, made vmappable by
    folding the vmapped axis into the rows (custom_partitioning ops have no batching rule of their own)."""
    @jax.custom_batching.custom_vmap
    def op(*args):
        return tuple(fn(*args))

    @op.def_vmap
    def _vmap(size, in_batched, *args):
        outs = op(*(_fold(x, batched, size) for x, batched in zip(args, in_batched)))
        outs = tuple(o.reshape(size, o.shape[0] // size, *o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return op
