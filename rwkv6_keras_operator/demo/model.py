"""A small RWKV6 ("Finch") language model in Keras 3 whose time-mixing calls RWKVKernelOperator.

Per block (pre-LayerNorm residual):
  time-mixing: token shift with data-dependent interpolation (a LoRA over the shifted difference),
      r, k, v, gate projections, data-dependent decay w = time_decay + tanh(x W1) W2 (raw: the operator
      applies exp(-exp(w))), bonus u, WKV via RWKVKernelOperator, group-norm per head, silu gate, output.
  channel-mixing: token shift, squared-ReLU key, value, sigmoid receptance.

`model(tokens)` gives logits (used by fit). `model.call_with_state(tokens, state)`, or `model((tokens, state))`, also
takes and returns the recurrent state, so text can be generated token by token (T = 1) or a prompt prefilled
in one call; `model.predict_on_batch((tokens, state))` runs the same compiled (jax.jit, tf.function):

    state = [(time-mix shift (B, C), WKV state (B, H, N, N) float32, channel-mix shift (B, C)) per block]
"""
import keras
import numpy as np
from keras import ops

from ..operator import RWKVKernelOperator

PACKAGE = "rwkv6_keras_operator.demo"


def _constant(values):
    return keras.initializers.Constant(np.asarray(values, np.float32))


def _token_shift(x, last):
    """x (B, T, C) -> the previous token's x at every step; `last` (B, C) stands before the first (or zeros)."""
    first = ops.zeros_like(x[:, :1]) if last is None else ops.expand_dims(ops.cast(last, x.dtype), 1)
    return ops.concatenate([first, x[:, :-1]], axis=1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TimeMix(keras.layers.Layer):
    def __init__(self, d_model, head_size, layer_id, n_layer, mix_rank=16, decay_rank=32, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.head_size, self.layer_id, self.n_layer = d_model, head_size, layer_id, n_layer
        self.mix_rank, self.decay_rank = mix_rank, decay_rank
        self.n_head = d_model // head_size
        self.operator = RWKVKernelOperator(head_size, ops_loop=True)
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        self.receptance = keras.layers.Dense(d_model, name="receptance", **dense)
        self.key = keras.layers.Dense(d_model, name="key", **dense)
        self.value = keras.layers.Dense(d_model, name="value", **dense)
        self.gate = keras.layers.Dense(d_model, name="gate", **dense)
        self.output_proj = keras.layers.Dense(d_model, kernel_initializer="zeros", name="output", **dense)

    def build(self, input_shape):
        C, H, N = self.d_model, self.n_head, self.head_size
        r01 = self.layer_id / max(self.n_layer - 1, 1)        # 0 for the first block, 1 for the last
        r10 = 1.0 - self.layer_id / self.n_layer                # 1 for the first block, towards 0
        ddd = np.arange(C) / C
        mix = lambda name, values: self.add_weight(shape=(C,), initializer=_constant(values), name=name)  # noqa: E731
        self.maa_x = mix("maa_x", 1 - ddd ** r10)
        self.maa_w = mix("maa_w", 1 - ddd ** r10)
        self.maa_k = mix("maa_k", 1 - ddd ** r10)
        self.maa_v = mix("maa_v", 1 - (ddd ** r10 + 0.3 * r01))
        self.maa_r = mix("maa_r", 1 - ddd ** (0.5 * r10))
        self.maa_g = mix("maa_g", 1 - ddd ** (0.5 * r10))
        small = keras.initializers.RandomUniform(-0.01, 0.01)
        self.maa_w1 = self.add_weight(shape=(C, 5 * self.mix_rank), initializer="zeros", name="maa_w1")
        self.maa_w2 = self.add_weight(shape=(5, self.mix_rank, C), initializer=small, name="maa_w2")
        n = np.arange(C)
        self.time_decay = mix("time_decay", -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01))
        self.decay_w1 = self.add_weight(shape=(C, self.decay_rank), initializer="zeros", name="decay_w1")
        self.decay_w2 = self.add_weight(shape=(self.decay_rank, C), initializer=small, name="decay_w2")
        bonus = r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
        self.u = self.add_weight(shape=(H, N), initializer=_constant(bonus.reshape(H, N)), name="u",
                                 autocast=False)
        self.ln_x_scale = self.add_weight(shape=(C,), initializer="ones", name="ln_x_scale")
        self.ln_x_bias = self.add_weight(shape=(C,), initializer="zeros", name="ln_x_bias")
        for dense in (self.receptance, self.key, self.value, self.gate, self.output_proj):
            dense.build((None, None, C))

    def _group_norm(self, y):
        """Normalise each head of each token on its own (RWKV's ln_x: GroupNorm with H groups)."""
        B, T = ops.shape(y)[0], ops.shape(y)[1]
        heads = ops.reshape(ops.cast(y, "float32"), (B, T, self.n_head, self.head_size))
        mean = ops.mean(heads, axis=-1, keepdims=True)
        var = ops.var(heads, axis=-1, keepdims=True)
        heads = (heads - mean) * ops.rsqrt(var + 64e-5)
        y = ops.reshape(heads, (B, T, self.d_model))
        return ops.cast(y * self.ln_x_scale + self.ln_x_bias, self.compute_dtype)

    def call(self, x, shift_state=None, wkv_state=None):
        """x (B, T, C) -> (out, last x (B, C), final WKV state (B, H, N, N) float32)."""
        B, T = ops.shape(x)[0], ops.shape(x)[1]
        xx = _token_shift(x, shift_state) - x
        xxx = x + xx * self.maa_x
        lora = ops.reshape(ops.tanh(ops.matmul(xxx, self.maa_w1)), (B, T, 5, self.mix_rank))
        mw, mk, mv, mr, mg = ops.unstack(ops.einsum("btfr,frc->fbtc", lora, self.maa_w2), 5, axis=0)
        xw = x + xx * (self.maa_w + mw)
        xk = x + xx * (self.maa_k + mk)
        xv = x + xx * (self.maa_v + mv)
        xr = x + xx * (self.maa_r + mr)
        xg = x + xx * (self.maa_g + mg)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = ops.silu(self.gate(xg))
        w = self.time_decay + ops.matmul(ops.tanh(ops.matmul(xw, self.decay_w1)), self.decay_w2)
        y, state = self.operator(r, k, v, ops.cast(w, r.dtype), self.u, with_state=True, init_state=wkv_state)
        return self.output_proj(self._group_norm(y) * g), x[:, -1], state

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "head_size": self.head_size,
                "layer_id": self.layer_id, "n_layer": self.n_layer, "mix_rank": self.mix_rank,
                "decay_rank": self.decay_rank}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ChannelMix(keras.layers.Layer):
    def __init__(self, d_model, layer_id, n_layer, hidden=None, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.layer_id, self.n_layer = d_model, layer_id, n_layer
        self.hidden = hidden or int(3.5 * d_model) // 32 * 32
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        self.key = keras.layers.Dense(self.hidden, name="key", **dense)
        self.value = keras.layers.Dense(d_model, kernel_initializer="zeros", name="value", **dense)
        self.receptance = keras.layers.Dense(d_model, name="receptance", **dense)

    def build(self, input_shape):
        C = self.d_model
        ddd = np.arange(C) / C
        r10 = 1.0 - self.layer_id / self.n_layer
        self.maa_k = self.add_weight(shape=(C,), initializer=_constant(1 - ddd ** r10), name="maa_k")
        self.maa_r = self.add_weight(shape=(C,), initializer=_constant(1 - ddd ** r10), name="maa_r")
        self.key.build((None, None, C))
        self.value.build((None, None, self.hidden))
        self.receptance.build((None, None, C))

    def call(self, x, shift_state=None):
        xx = _token_shift(x, shift_state) - x
        k = ops.square(ops.relu(self.key(x + xx * self.maa_k)))
        return ops.sigmoid(self.receptance(x + xx * self.maa_r)) * self.value(k), x[:, -1]

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "layer_id": self.layer_id,
                "n_layer": self.n_layer, "hidden": self.hidden}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Block(keras.layers.Layer):
    """x + time_mix(ln1(x)), then + channel_mix(ln2(.)); state = (tm shift, WKV state, cm shift)."""

    def __init__(self, d_model, head_size, layer_id, n_layer, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.head_size, self.layer_id, self.n_layer = d_model, head_size, layer_id, n_layer
        self.ln1 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln1")
        self.time_mix = TimeMix(d_model, head_size, layer_id, n_layer, name="time_mix")
        self.ln2 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln2")
        self.channel_mix = ChannelMix(d_model, layer_id, n_layer, name="channel_mix")

    def build(self, input_shape):
        for layer in (self.ln1, self.time_mix, self.ln2, self.channel_mix):
            layer.build(input_shape)

    def call(self, x, state=None):
        tm_shift, wkv, cm_shift = (None, None, None) if state is None else state
        dx, tm_shift, wkv = self.time_mix(self.ln1(x), shift_state=tm_shift, wkv_state=wkv)
        x = x + dx
        dx, cm_shift = self.channel_mix(self.ln2(x), shift_state=cm_shift)
        return x + dx, (tm_shift, wkv, cm_shift)

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "head_size": self.head_size,
                "layer_id": self.layer_id, "n_layer": self.n_layer}


@keras.saving.register_keras_serializable(package=PACKAGE)
class RWKV6LM(keras.Model):
    """Character (or any token) language model: Embedding, LayerNorm, n_layer RWKV6 blocks, LayerNorm, head."""

    def __init__(self, vocab_size, d_model=128, n_layer=2, head_size=32, **kwargs):
        super().__init__(**kwargs)
        if d_model % head_size:
            raise ValueError(f"d_model ({d_model}) must be a multiple of head_size ({head_size}).")
        self.vocab_size, self.d_model, self.n_layer, self.head_size = vocab_size, d_model, n_layer, head_size
        self.embed = keras.layers.Embedding(
            vocab_size, d_model, embeddings_initializer=keras.initializers.RandomUniform(-1e-4, 1e-4), name="embed")
        self.ln0 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln0")
        self.blocks = [Block(d_model, head_size, i, n_layer, name=f"block_{i}") for i in range(n_layer)]
        self.ln_out = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_out")
        self.head = keras.layers.Dense(vocab_size, use_bias=False, name="head")

    def call_with_state(self, tokens, state=None):
        """tokens (B, T) ints -> logits (B, T, vocab) float32 and the state after the last token."""
        x = self.ln0(self.embed(tokens))
        new_state = []
        for i, block in enumerate(self.blocks):
            x, block_state = block(x, state=None if state is None else state[i])
            new_state.append(block_state)
        return ops.cast(self.head(self.ln_out(x)), "float32"), new_state

    def initial_state(self, batch_size):
        """The all-zero state: the same as passing no state at all."""
        C, H, N = self.d_model, self.d_model // self.head_size, self.head_size
        return [(np.zeros((batch_size, C), "float32"), np.zeros((batch_size, H, N, N), "float32"),
                 np.zeros((batch_size, C), "float32")) for _ in range(self.n_layer)]

    def call(self, inputs):
        """tokens -> logits (what fit uses), or (tokens, state) -> (logits, state) (what predict uses)."""
        if isinstance(inputs, (tuple, list)):
            return self.call_with_state(*inputs)
        return self.call_with_state(inputs)[0]

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "d_model": self.d_model,
                "n_layer": self.n_layer, "head_size": self.head_size}
