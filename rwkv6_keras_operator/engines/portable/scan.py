"""The states at chunk boundaries: S_{c+1} = decay_c * S_c + kv_c, for c = 0 .. nc - 1.

One recurrence, three ways, because each backend's generic loop has its own cost trap:
- jax: `lax.scan` (through ops.scan): compiled once, linear.
- torch: a Python loop over the chunks, unstacked once (keras' torch scan indexes xs[i] at every step, and
  the backward of each index materialises a zero tensor the size of all of xs: quadratic in nc).
- tensorflow: keras' scan builds a while loop without maximum_iterations, which XLA cannot compile under a
  gradient tape, and the gradient of tf.scan is quadratic in nc under XLA. With nc known while tracing (XLA
  needs static shapes anyway) the recurrence runs loop-free, in blocks: within groups of GROUP chunks from a
  zero state (unrolled, all groups at once), then recursively over the groups' totals. Only with an unknown
  nc (graph mode with an unknown sequence length) does it fall back to tf.scan.
All ways use products of decays (<= 1) and sums only, like the recurrence itself.
"""
import keras
from keras import ops

GROUP = 8


def chunk_states(decay, kv, s0):
    """decay: (nc, B, H, N, 1), kv: (nc, B, H, N, N), s0: (B, H, N, N), all float32.

    Returns the state after the last chunk (B, H, N, N) and the state at the start of every chunk
    (nc, B, H, N, N).
    """
    backend = keras.backend.backend()
    if backend == "torch":
        state, starts = s0, []
        for d, contrib in zip(ops.unstack(decay), ops.unstack(kv)):
            starts.append(state)
            state = d * state + contrib
        return state, ops.stack(starts)
    if backend == "tensorflow":
        if isinstance(decay.shape[0], int):
            return _blocked(decay, kv, s0)
        import tensorflow as tf

        carried = tf.scan(lambda c, x: (x[0] * c[0] + x[1], c[0]), (decay, kv), initializer=(s0, s0))
        return carried[0][-1], carried[1]
    return ops.scan(lambda state, x: (x[0] * state + x[1], state), s0, (decay, kv))


def _blocked(decay, kv, s0):
    nc = decay.shape[0]
    if nc <= GROUP:
        state, starts = s0, []
        for c in range(nc):
            starts.append(state)
            state = decay[c] * state + kv[c]
        return state, ops.stack(starts)
    pad = -nc % GROUP
    if pad:  # identity steps: decay 1, nothing added (pad < GROUP < nc)
        decay = ops.concatenate([decay, ops.ones_like(decay[:pad])], axis=0)
        kv = ops.concatenate([kv, ops.zeros_like(kv[:pad])], axis=0)
    ng = (nc + pad) // GROUP
    state_shape = ops.shape(kv)[1:]  # may hold tensors: an unknown batch while tracing
    d = ops.reshape(decay, (ng, GROUP, *ops.shape(decay)[1:]))
    a = ops.reshape(kv, (ng, GROUP, *state_shape))
    # within each group, from a zero state: the state before chunk j and the decay product over chunks < j
    local, through = [ops.zeros_like(a[:, 0])], [ops.ones_like(d[:, 0])]
    for j in range(GROUP):
        local.append(d[:, j] * local[-1] + a[:, j])
        through.append(through[-1] * d[:, j])
    last, group_starts = _blocked(through[GROUP], local[GROUP], s0)       # over the groups' totals
    starts = (ops.stack(through[:GROUP], axis=1) * ops.expand_dims(group_starts, 1)
              + ops.stack(local[:GROUP], axis=1))
    return last, ops.reshape(starts, (ng * GROUP, *state_shape))[:nc]
