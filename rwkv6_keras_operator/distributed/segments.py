"""The math of one sequence cut into consecutive segments, one a device (docs/math.md, "Segments across devices").

Over a segment the recurrence is an affine map of its start state, per (row, head):

    S_out = diag(a) S_in + S_local,    a = exp(sum of g over the segment),   S_local = the end state from zero

so the devices exchange the pairs (log a, S_local), H·N + H·N² floats a row whatever the segment's length, and each
one finds its start state by an exclusive scan over the devices in time order. Its outputs, computed from a zero
state, then miss exactly the start state's term:

    y_t += (r_t ⊙ exp(Gx_t)) · S_in,    Gx_t = sum of g over the segment's positions before t (<= 0)

S_local can also be found without running the segment, as one product (local_state); backward, each segment's start
state gets its own outputs' gradient (start_gradient) and the decayed gradient of its end, which a reverse scan over
the devices gives (end_gradients).

Written in keras.ops (jax and torch), float32 throughout; every exponent is a sum of log-decays, so <= 0.
"""
import keras
from keras import ops

from ..engines.portable.chunked import log_decay


def segment_log_decay(w):
    """g (B, T, H, N) float32 of w (B, T, H, N), and log a: its sum over the segment, (B, H, N)."""
    g = log_decay(w)
    return g, ops.sum(g, axis=1)


def exclusive_log_decay(g):
    """Gx_t = g_0 + ... + g_{t-1} over axis 1 (zero at t = 0): a cumulative sum shifted by one, never a difference
    of two running sums (which loses a small sum next to a large g to cancellation)."""
    shifted = ops.concatenate([ops.zeros_like(g[:, :1]), g[:, :-1]], axis=1)
    return ops.cumsum(shifted, axis=1)


def start_states(log_a, local, s0):
    """The exclusive scan over devices in time order.

    log_a (D, B, H, N) and local (D, B, H, N, N): each device's pair; s0 (B, H, N, N): the start state of the
    sequence. Returns the start state of every segment (D, B, H, N, N) and the state after the last one (B, H, N, N).
    D is small (the devices of one mesh axis or group): a loop of D element-wise steps."""
    state, starts = s0, []
    for d in range(log_a.shape[0]):
        starts.append(state)
        state = ops.exp(log_a[d])[..., None] * state + local[d]
    return ops.stack(starts, axis=0), state


def _einsum(spec, a, b):
    """float32 einsum with full float32 products (jax would use TF32 on an NVIDIA GPU)."""
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.einsum(spec, a, b, precision="highest")
    return ops.einsum(spec, a, b)


def _from_start(r, g):
    """r_t ⊙ exp(Gx_t), float32: the decays from the segment start to each position applied to r."""
    return ops.cast(r, "float32") * ops.exp(exclusive_log_decay(g))


def start_term(r, g, s_in):
    """(r_t ⊙ exp(Gx_t)) · S_in for every position: the outputs' share of the segment's start state.

    r, g: (B, T, H, N) (g float32); s_in: (B, H, N, N) float32. Returns (B, T, H, N) float32."""
    return _einsum("bthi,bhij->bthj", _from_start(r, g), s_in)


def start_gradient(r, g, dy):
    """Σ_t (r_t ⊙ exp(Gx_t)) dy_tᵀ: the gradient of the segment's start state from its own outputs (start_term
    transposed). r, g, dy: (B, T, H, N). Returns (B, H, N, N) float32."""
    return _einsum("bthi,bthj->bhij", _from_start(r, g), ops.cast(dy, "float32"))


def local_state(k, v, g):
    """S_local = Σ_t (k_t ⊙ exp(Gs_t)) v_tᵀ, Gs_t = Σ_{t < m < segment end} g_m <= 0: the segment's end state from a
    zero start, as one product (no chunks, no scan). k, v, g: (B, T, H, N). Returns (B, H, N, N) float32."""
    to_end = ops.flip(exclusive_log_decay(ops.flip(g, axis=1)), axis=1)   # a cumulative sum from the end
    return _einsum("bthi,bthj->bhij", ops.cast(k, "float32") * ops.exp(to_end), ops.cast(v, "float32"))


def end_gradients(log_a, local_grads, d_final):
    """The reverse scan over devices: the gradient of every segment's end state.

    log_a (D, B, H, N): each segment's pair's log a; local_grads (D, B, H, N, N): the gradient of each segment's
    start state from its own outputs (start_gradient); d_final (B, H, N, N): the gradient of the state after the
    last segment. Segment d's end is segment d + 1's start, whose gradient is its own part plus the decayed one of
    its end: dS_end(D-1) = d_final, dS_end(d) = diag(a_{d+1}) dS_end(d+1) + local_grads[d+1]. Returns (D, B, H, N,
    N)."""
    grad, ends = d_final, [d_final]
    for d in range(log_a.shape[0] - 1, 0, -1):
        grad = ops.exp(log_a[d])[..., None] * grad + local_grads[d]
        ends.append(grad)
    return ops.stack(ends[::-1], axis=0)
