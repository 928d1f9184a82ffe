"""The layers of an RWKV-6 ("x060", Finch) block, as in RWKV-LM v6 and the `rwkv` pip package, with the WKV
through RWKVKernelOperator.

Per block (pre-LayerNorm residual; x is the LayerNorm output, `prev` the previous token's x):
  time mix:    xx = prev - x;  xxx = x + xx * maa_x
               (mw, mk, mv, mr, mg) = tanh(xxx @ maa_w1) @ maa_w2          (a LoRA per mix, 5 of them)
               x_w = x + xx * (maa_w + mw), ... x_g likewise
               r, k, v = x_r @ R, x_k @ K, x_v @ V;  g = silu(x_g @ G)
               w = time_decay + tanh(x_w @ decay_w1) @ decay_w2            (raw: the decay is exp(-exp(w)))
               y = WKV(r, k, v, w, u = time_faaaa, start state)
               out = (GroupNorm_H(y; eps 64e-5) * g) @ O
  channel mix: xx = prev - x;  k = relu((x + xx * maa_k) @ K)^2;  r = sigmoid((x + xx * maa_r) @ R)
               out = r * (k @ V)

Every layer's variables carry the name of their checkpoint key (Dense kernels hold the transposed weight).
"""
import keras
from keras import ops

from ..operator import RWKVKernelOperator

PACKAGE = "rwkv6_keras_operator.models"
GROUP_NORM_EPSILON = 64e-5      # the official ln_x
LAYER_NORM_EPSILON = 1e-5       # torch's LayerNorm default, used by ln0, ln1, ln2, ln_out


def token_shift(x, prev):
    """x (B, T, C) -> the previous token's x at every step; `prev` (B, C) stands before the first (None: zeros)."""
    first = ops.zeros_like(x[:, :1]) if prev is None else ops.expand_dims(ops.cast(prev, x.dtype), 1)
    return ops.concatenate([first, x[:, :-1]], axis=1)


class _Sublayer(keras.layers.Layer):
    """A layer whose call takes states besides x: the dtype policy must not cast them (the WKV state stays
    float32), so x is cast to the compute dtype in call() instead of by Keras."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    def dense(self, units, name):
        return keras.layers.Dense(units, use_bias=False, name=name, dtype=self.dtype_policy)

    def vector(self, name, size=None, initializer="zeros"):
        return self.add_weight(shape=(size or self.config.n_embd,), initializer=initializer, name=name)


class TimeMix(_Sublayer):
    """RWKV-6 time mixing; `call(x, prev, wkv_state)` -> (out, last x (B, C) float32, WKV state (B, H, N, N)).

    `wkv_state` None starts every row from `time_state` (H, N, N), the model's start state (zeros unless a
    state-tuned checkpoint set it); gradients flow to it through the operator."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        C = config.n_embd
        self.operator = RWKVKernelOperator(config.head_size)
        self.receptance, self.key, self.value, self.gate = (
            self.dense(C, name) for name in ("receptance", "key", "value", "gate"))
        self.output_proj = self.dense(C, "output")

    def build(self, input_shape=None):
        cfg = self.config
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        for name in "xwkvrg":
            setattr(self, f"time_maa_{name}", self.vector(f"time_maa_{name}"))
        self.time_maa_w1 = self.add_weight(shape=(C, 5 * cfg.mix_lora), initializer="zeros", name="time_maa_w1")
        self.time_maa_w2 = self.add_weight(shape=(5, cfg.mix_lora, C), initializer="zeros", name="time_maa_w2")
        self.time_decay = self.vector("time_decay")
        self.time_decay_w1 = self.add_weight(shape=(C, cfg.decay_lora), initializer="zeros", name="time_decay_w1")
        self.time_decay_w2 = self.add_weight(shape=(cfg.decay_lora, C), initializer="zeros", name="time_decay_w2")
        # float32 whatever the policy, as the operator uses them
        self.time_faaaa = self.add_weight(shape=(H, N), initializer="zeros", dtype="float32", autocast=False,
                                          name="time_faaaa")
        # Created trainable (TensorFlow's tape watches only variables created so), then left out of training
        # until RWKV6.set_trainable(start_states=True) asks for it.
        self.time_state = self.add_weight(shape=(H, N, N), initializer="zeros", dtype="float32", autocast=False,
                                          name="time_state")
        self.time_state.trainable = False
        self.ln_x_weight = self.vector("ln_x_weight", initializer="ones")
        self.ln_x_bias = self.vector("ln_x_bias")
        for dense in (self.receptance, self.key, self.value, self.gate, self.output_proj):
            dense.build((None, None, C))

    def checkpoint_variables(self, prefix):
        """{checkpoint key: (variable, layout)}; layout "linear": the file holds the transposed kernel,
        "state": the file holds (H, value, key), else the same values in the file's shape."""
        table = {f"{prefix}time_maa_{n}": (getattr(self, f"time_maa_{n}"), "plain") for n in "xwkvrg"}
        for name in ("time_maa_w1", "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa"):
            table[prefix + name] = (getattr(self, name), "plain")
        for name, dense in (("receptance", self.receptance), ("key", self.key), ("value", self.value),
                            ("gate", self.gate), ("output", self.output_proj)):
            table[f"{prefix}{name}.weight"] = (dense.kernel, "linear")
        table[f"{prefix}ln_x.weight"] = (self.ln_x_weight, "plain")
        table[f"{prefix}ln_x.bias"] = (self.ln_x_bias, "plain")
        table[f"{prefix}time_state"] = (self.time_state, "state")
        return table

    def _group_norm(self, y):
        """ln_x: each head of each token normalised on its own (GroupNorm with H groups), in float32."""
        cfg = self.config
        B, T = ops.shape(y)[0], ops.shape(y)[1]
        heads = ops.reshape(ops.cast(y, "float32"), (B, T, cfg.n_head, cfg.head_size))
        mean = ops.mean(heads, axis=-1, keepdims=True)
        var = ops.mean(ops.square(heads - mean), axis=-1, keepdims=True)
        heads = (heads - mean) * ops.rsqrt(var + GROUP_NORM_EPSILON)
        y = ops.reshape(heads, (B, T, cfg.n_embd))
        return ops.cast(y * ops.cast(self.ln_x_weight, "float32") + ops.cast(self.ln_x_bias, "float32"),
                        self.compute_dtype)

    def call(self, x, prev=None, wkv_state=None):
        cfg = self.config
        x = ops.cast(x, self.compute_dtype)
        B, T = ops.shape(x)[0], ops.shape(x)[1]
        xx = token_shift(x, prev) - x
        xxx = x + xx * self.time_maa_x
        lora = ops.reshape(ops.tanh(ops.matmul(xxx, self.time_maa_w1)), (B, T, 5, cfg.mix_lora))
        mw, mk, mv, mr, mg = ops.unstack(ops.einsum("btfr,frc->fbtc", lora, self.time_maa_w2), 5, axis=0)
        r = self.receptance(x + xx * (self.time_maa_r + mr))
        k = self.key(x + xx * (self.time_maa_k + mk))
        v = self.value(x + xx * (self.time_maa_v + mv))
        g = ops.silu(self.gate(x + xx * (self.time_maa_g + mg)))
        decay_lora = ops.matmul(ops.tanh(ops.matmul(x + xx * (self.time_maa_w + mw), self.time_decay_w1)),
                                self.time_decay_w2)
        w = ops.cast(self.time_decay, "float32") + ops.cast(decay_lora, "float32")
        start = self.time_state if wkv_state is None else wkv_state
        y, state = self.operator(r, k, v, ops.cast(w, r.dtype), self.time_faaaa, with_state=True,
                                 init_state=start)
        out = self.output_proj(self._group_norm(y) * g)
        return out, ops.cast(x[:, -1], "float32"), state


class ChannelMix(_Sublayer):
    """RWKV-6 channel mixing; `call(x, prev)` -> (out, last x (B, C) float32)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.key = self.dense(config.dim_ffn, "key")
        self.receptance = self.dense(config.n_embd, "receptance")
        self.value = self.dense(config.n_embd, "value")

    def build(self, input_shape=None):
        C = self.config.n_embd
        self.time_maa_k = self.vector("time_maa_k")
        self.time_maa_r = self.vector("time_maa_r")
        self.key.build((None, None, C))
        self.receptance.build((None, None, C))
        self.value.build((None, None, self.config.dim_ffn))

    def checkpoint_variables(self, prefix):
        return {f"{prefix}time_maa_k": (self.time_maa_k, "plain"), f"{prefix}time_maa_r": (self.time_maa_r, "plain"),
                f"{prefix}key.weight": (self.key.kernel, "linear"),
                f"{prefix}receptance.weight": (self.receptance.kernel, "linear"),
                f"{prefix}value.weight": (self.value.kernel, "linear")}

    def call(self, x, prev=None):
        x = ops.cast(x, self.compute_dtype)
        xx = token_shift(x, prev) - x
        k = ops.square(ops.relu(self.key(x + xx * self.time_maa_k)))
        r = ops.sigmoid(self.receptance(x + xx * self.time_maa_r))
        return r * self.value(k), ops.cast(x[:, -1], "float32")


class Block(_Sublayer):
    """x + att(ln1(x)), then + ffn(ln2(.)); state (time-mix shift, WKV state, channel-mix shift) or None."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        norm = dict(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype_policy)
        self.ln1 = keras.layers.LayerNormalization(name="ln1", **norm)
        self.att = TimeMix(config, name="att", dtype=self.dtype_policy)
        self.ln2 = keras.layers.LayerNormalization(name="ln2", **norm)
        self.ffn = ChannelMix(config, name="ffn", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        for layer in (self.ln1, self.att, self.ln2, self.ffn):
            layer.build((None, None, self.config.n_embd))

    def checkpoint_variables(self, prefix):
        table = {}
        for name, norm in (("ln1", self.ln1), ("ln2", self.ln2)):
            table[f"{prefix}{name}.weight"] = (norm.gamma, "plain")
            table[f"{prefix}{name}.bias"] = (norm.beta, "plain")
        table.update(self.att.checkpoint_variables(prefix + "att."))
        table.update(self.ffn.checkpoint_variables(prefix + "ffn."))
        return table

    def call(self, x, state=None):
        att_prev, wkv, ffn_prev = (None, None, None) if state is None else state
        dx, att_prev, wkv = self.att(self.ln1(x), att_prev, wkv)
        x = x + ops.cast(dx, x.dtype)
        dx, ffn_prev = self.ffn(self.ln2(x), ffn_prev)
        return x + ops.cast(dx, x.dtype), (att_prev, wkv, ffn_prev)
