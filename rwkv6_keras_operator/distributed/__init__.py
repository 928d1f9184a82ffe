"""One long sequence cut along its time axis across devices (docs/math.md, "Segments across devices").

torch: `sequence_parallel(op, r, k, v, w, u, group=None, init_state=None, with_state=False)` (distributed/torch.py),
called by every rank of a torch.distributed group with its own consecutive slice of T.
jax: nothing to call: under jax.jit, inputs sharded along T run each device on its own segment
(distributed/jax.py, engines/pallas/sharding.py); the devices exchange only the per-segment pairs of segments.py.
"""


def sequence_parallel(op, r, k, v, w, u, group=None, init_state=None, with_state=False, check_shapes=True):
    from .torch import sequence_parallel as _sequence_parallel

    return _sequence_parallel(op, r, k, v, w, u, group=group, init_state=init_state, with_state=with_state,
                              check_shapes=check_shapes)


sequence_parallel.__doc__ = """The operator's call on one sequence cut along T across the ranks of a torch.distributed
group; see rwkv6_keras_operator.distributed.torch.sequence_parallel."""
