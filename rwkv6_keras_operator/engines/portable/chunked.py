"""The chunked WKV forward in `keras.ops`: runs, and differentiates, on jax, torch and tensorflow.

The math is written down in docs/math.md; in short, per (batch, head) and with d = exp(-exp(w)) in [0, 1]:

* The sequence is cut into chunks of L = 2^K tokens. Inside a chunk, the pair (t, s), s < t, carries the
  weight W[t, s] = prod_{s<j<t} d_j <= 1. A binary tree splits every block of 2h positions into an upper
  half U and a lower half D; for t in D and s in U the product splits at the boundary between the halves:

      W[t, s] = pre_h(t) * suf_h(s)

  where pre_h(t) multiplies d over D's positions before t and suf_h(s) over U's positions after s. Both
  are <= 1 and each is a direct product over a contiguous range (built level by level from the finer
  ones, never a quotient), so nothing overflows and nothing cancels. The pair block of that level is a
  matrix product: (r_D * pre_h) @ (k_U * suf_h)^T, times v_U.
* Across chunks the state is carried by a recurrence over chunks (scan.py):
  S <- tot * S + sum_s (k_s * suf_L(s)) v_s^T, and each token reads the state at its chunk's start through
  r_t * pre_L(t).

All of it runs in float32 whatever the input dtype; for float32 inputs the matrix products are full float32
products (`matmul`), also where the backend would use TF32 on its own (jax on NVIDIA GPUs). `w` is clamped at
shared.W_MAX before exp(w): beyond it the decay exp(-exp(w)) is exactly 0.0 in float32 either way, and -inf (from
exp(+100)) never appears.
"""
import keras
from keras import ops

from ..shared import W_MAX, chunk_length
from .scan import chunk_states

CHUNK = 32


def matmul(a, b, exact):
    """a @ b. exact: full float32 products. jax on an NVIDIA GPU would otherwise multiply float32 matrices in TF32
    (10-bit mantissa: ~1e-3 relative error a product); torch keeps float32 unless the user allows TF32;
    tensorflow follows `tf.config.experimental.enable_tensor_float_32_execution` (README, FAQ)."""
    if exact and keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.matmul(a, b, precision="highest")
    return ops.matmul(a, b)


def log_decay(w):
    """g = -exp(w) in float32, finite for any w (see shared.W_MAX)."""
    return -ops.exp(ops.minimum(ops.cast(w, "float32"), W_MAX))


def _tree_intra(r, k, v, d, exact):
    """Intra-chunk part, all chunks at once. r, k, v: (M, L, N) float32; d = exp(g): (M, L, N).

    Returns y_intra (M, L, N) and, for the chunk as a whole, the decay products over the positions before
    each token (pre), after each token (suf) and over the chunk (tot, (M, 1, N)). Every product is built
    from products over whole halves, so each factor is <= 1 and each is exact to a few ulps.
    """
    L, N = r.shape[1:]
    y = ops.zeros_like(r)
    pre = ops.ones_like(d)   # product of d over the h-block's positions before t (h = 1: empty)
    suf = ops.ones_like(d)   # ... after t
    tot = d                  # ... over each whole h-block: (M, L / h, N)
    h = 1
    while h < L:
        nb = L // (2 * h)
        r5, k5, v5, pre5, suf5 = (ops.reshape(x, (-1, nb, 2, h, N)) for x in (r, k, v, pre, suf))
        tot4 = ops.reshape(tot, (-1, nb, 2, 1, N))
        tot_up, tot_dn = tot4[:, :, 0], tot4[:, :, 1]
        # pair block of this level: t in the lower half, s in the upper half
        rq = r5[:, :, 1] * pre5[:, :, 1]
        kq = k5[:, :, 0] * suf5[:, :, 0]
        # (a copied, not a strided view, as matmul operand: torch's CPU backward of bmm on strided views
        # takes a per-matrix slow path)
        a = matmul(rq, ops.swapaxes(kq, -1, -2), exact)
        y_dn = matmul(a, ops.copy(v5[:, :, 0]), exact)
        y = y + ops.reshape(ops.stack([ops.zeros_like(y_dn), y_dn], axis=2), (-1, L, N))
        # grow the products to blocks of 2h: each half takes in the other half's total on its far side
        pre = ops.reshape(ops.stack([pre5[:, :, 0], pre5[:, :, 1] * tot_up], axis=2), (-1, L, N))
        suf = ops.reshape(ops.stack([suf5[:, :, 0] * tot_dn, suf5[:, :, 1]], axis=2), (-1, L, N))
        tot = ops.reshape(tot_up * tot_dn, (-1, nb, N))
        h *= 2
    return y, pre, suf, tot


def chunked_wkv(r, k, v, w, u, s0, chunk=CHUNK):
    """y, final state of the WKV recurrence. r, k, v, w: (B, T, H, N); u: (H, N); s0: (B, H, N, N) or None.

    Returns y (B, T, H, N) in r's dtype and the float32 state after the last step (B, H, N, N).
    """
    B, T, H, N = ops.shape(r)  # B and T may be tensors (tf.function with unknown dims)
    dtype = r.dtype
    L = chunk_length(T, chunk) if isinstance(T, int) else chunk
    pad = (-T) % L
    nc = (T + pad) // L
    f32 = lambda x: ops.cast(x, "float32")  # noqa: E731
    r, k, v, d = f32(r), f32(k), f32(v), ops.exp(log_decay(w))
    u = f32(u)
    bonus = ops.sum(r * u * k, axis=-1, keepdims=True) * v  # the diagonal t = s: u replaces the state
    if not isinstance(pad, int) or pad:
        # padded steps: zero keys/values add nothing, decay 1 leaves the state alone
        zeros = ops.zeros((B, pad, H, N), "float32")
        r, k, v = (ops.concatenate([x, zeros], axis=1) for x in (r, k, v))
        d = ops.concatenate([d, zeros + 1.0], axis=1)

    def to_chunks(x):  # (B, T, H, N) -> (B*H*nc, L, N)
        x = ops.transpose(ops.reshape(x, (B, nc, L, H, N)), (0, 3, 1, 2, 4))
        return ops.reshape(x, (-1, L, N))

    rc, kc, vc, dc = map(to_chunks, (r, k, v, d))
    exact = keras.backend.standardize_dtype(dtype) == "float32"
    y_intra, pre, suf, tot = _tree_intra(rc, kc, vc, dc, exact)

    # the chunk's own contribution to the state, and its decay
    kv = matmul(ops.swapaxes(kc * suf, -1, -2), vc, exact)               # (M, N, N)
    kv = ops.transpose(ops.reshape(kv, (B, H, nc, N, N)), (2, 0, 1, 3, 4))  # (nc, B, H, N, N)
    if s0 is None:
        s0 = ops.zeros_like(kv[0])
    decay = ops.transpose(ops.reshape(tot, (B, H, nc, N, 1)), (2, 0, 1, 3, 4))

    s_last, s_starts = chunk_states(decay, kv, s0)                      # s_starts: (nc, B, H, N, N)
    s_starts = ops.reshape(ops.transpose(s_starts, (1, 2, 0, 3, 4)), (-1, N, N))
    y = y_intra + matmul(rc * pre, s_starts, exact)
    y = ops.transpose(ops.reshape(y, (B, H, nc * L, N)), (0, 2, 1, 3))[:, :T]
    return ops.cast(y + bonus, dtype), s_last
