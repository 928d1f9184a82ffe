"""RWKV6: the official RWKV-6 ("x060", Finch) language model in Keras 3, loading and saving BlinkDL's checkpoints.

    model = RWKV6.from_checkpoint("RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth")
    logits = model(tokens)                                    # (B, T) ints -> (B, T, vocab) float32
    logits, state = model.call_with_state(tokens, state=None)  # carry the state on to the next call
    new_tokens = model.generate(prompt_tokens, 100, temperature=1.0, top_p=0.7, seed=0)
    model.save_checkpoint("out.pth")                          # the official layout, loadable by `rwkv`

The state is a list with one tuple per layer: (time-mix shift (B, C) float32, WKV state (B, H, N, N) float32
(key, value) as RWKVKernelOperator's, channel-mix shift (B, C) float32).
"""
import keras
import numpy as np
from keras import ops

from . import checkpoint as ckpt
from .checkpoint import RWKV6Config
from .layers import LAYER_NORM_EPSILON, PACKAGE, Block


def _concrete(tokens):
    """The token ids as NumPy when their values are known here (not while jax.jit, tf.function or Keras'
    symbolic tracing runs), else None."""
    if isinstance(tokens, (list, tuple, np.ndarray, np.generic)):
        return np.asarray(tokens)
    if isinstance(tokens, keras.KerasTensor):
        return None
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return None if isinstance(tokens, jax.core.Tracer) else np.asarray(tokens)
    if backend == "tensorflow":
        import tensorflow as tf

        return tokens.numpy() if tf.executing_eagerly() and hasattr(tokens, "numpy") else None
    if backend == "torch":
        import torch

        if torch.compiler.is_compiling():
            return None
        return tokens.detach().cpu().numpy()
    return None


@keras.saving.register_keras_serializable(package=PACKAGE)
class RWKV6(keras.Model):
    """The RWKV-6 language model: emb -> blocks.0.ln0 -> n_layer blocks -> ln_out -> head.

    Args:
        config: an RWKV6Config (or its dict), e.g. from a checkpoint's shapes.
        dtype: the Keras dtype policy ("float32", "mixed_bfloat16", "bfloat16", ...); None: Keras' global one.
    The per-layer start states (`blocks[i].att.time_state`, (H, N, N) float32) are variables: zeros, or a
    state-tuned checkpoint's `time_state`. `set_trainable(weights=False, start_states=True)` trains only them.
    """

    def __init__(self, config, dtype=None, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.config = config = config if isinstance(config, RWKV6Config) else RWKV6Config(**config)
        norm = dict(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype_policy)
        self.emb = keras.layers.Embedding(config.vocab_size, config.n_embd, name="emb", dtype=self.dtype_policy)
        self.ln0 = keras.layers.LayerNormalization(name="ln0", **norm)
        self.blocks = [Block(config, name=f"block_{i}", dtype=self.dtype_policy) for i in range(config.n_layer)]
        self.ln_out = keras.layers.LayerNormalization(name="ln_out", **norm)
        self.head = keras.layers.Dense(config.vocab_size, use_bias=False, name="head", dtype=self.dtype_policy)
        self.emb.build((None, None))
        for layer in (self.ln0, *self.blocks, self.ln_out, self.head):
            layer.build((None, None, config.n_embd))
        self.built = True

    # ---- checkpoints

    @classmethod
    def from_checkpoint(cls, path, dtype=None):
        """The model of an official RWKV-6 checkpoint (.pth: needs torch; .safetensors: needs safetensors), with
        its weights, and its `time_state` tensors as start states when it has them."""
        weights = ckpt.read_checkpoint(path)
        config = ckpt.config_from_weights(weights)
        ckpt.validate(weights, config)
        model = cls(config, dtype=dtype)
        model.load_checkpoint_weights(weights)
        return model

    def checkpoint_variables(self):
        """{checkpoint key: (variable, layout)} of every variable; see TimeMix.checkpoint_variables."""
        table = {"emb.weight": (self.emb.embeddings, "plain"),
                 "blocks.0.ln0.weight": (self.ln0.gamma, "plain"), "blocks.0.ln0.bias": (self.ln0.beta, "plain")}
        for i, block in enumerate(self.blocks):
            table.update(block.checkpoint_variables(f"blocks.{i}."))
        table.update({"ln_out.weight": (self.ln_out.gamma, "plain"), "ln_out.bias": (self.ln_out.beta, "plain"),
                      "head.weight": (self.head.kernel, "linear")})
        return table

    def load_checkpoint_weights(self, weights):
        """Assigns {key: array} in the official layout (validated first); start states the file lacks: zeros."""
        ckpt.validate(weights, self.config)
        for key, (variable, layout) in self.checkpoint_variables().items():
            if key not in weights:      # only time_state may be absent (validate checked the rest)
                variable.assign(np.zeros(variable.shape, np.float32))
                continue
            value = np.asarray(weights[key], np.float32)
            if layout == "linear":
                value = value.T
            value = value.reshape(variable.shape)
            if layout == "state":
                value = np.swapaxes(value, -1, -2)
            variable.assign(value)

    def checkpoint_weights(self, time_state=None):
        """{key: float32 NumPy array} in the official layout. time_state: include the start states (None: when
        any of them is not zero, e.g. after state tuning or when loaded from a state-tuned file)."""
        start_states = [ops.convert_to_numpy(block.att.time_state.value) for block in self.blocks]
        if time_state is None:
            time_state = any(np.any(s != 0) for s in start_states)
        shapes = self.config.checkpoint_shapes(time_state=bool(time_state))
        weights = {}
        for key, (variable, layout) in self.checkpoint_variables().items():
            if key not in shapes:
                continue
            value = np.asarray(ops.convert_to_numpy(ops.cast(variable, "float32")))
            if layout == "linear":
                value = value.T
            elif layout == "state":
                value = np.swapaxes(value, -1, -2)
            weights[key] = np.ascontiguousarray(value.reshape(shapes[key]))
        return weights

    def save_checkpoint(self, path, dtype="float32", time_state=None):
        """Writes the official layout (.pth through torch, or .safetensors) that the `rwkv` runtime and RWKV-LM
        load; `blocks.{i}.att.time_state` (H, value, key) is included when the start states are not all zero
        (time_state=None) or when asked (True). dtype: "float32" or "bfloat16" (the released files' dtype)."""
        return ckpt.write_checkpoint(path, self.checkpoint_weights(time_state), dtype=dtype)

    # ---- trainability

    def set_trainable(self, weights=True, start_states=False):
        """Which variables fit() trains: the weights, the per-layer start states (state tuning: weights=False,
        start_states=True), or both. Compile after changing it."""
        for variable in self.variables:
            variable.trainable = bool(weights)
        for block in self.blocks:
            block.att.time_state.trainable = bool(start_states)

    @property
    def start_states(self):
        """The per-layer start state variables, (H, N, N) float32 each, (key, value) layout."""
        return [block.att.time_state for block in self.blocks]

    # ---- running

    def _check_tokens(self, tokens):
        if isinstance(tokens, (list, tuple)):
            tokens = np.asarray(tokens)
        if len(tokens.shape) != 2:
            raise ValueError(f"`tokens` must be (batch, time) token ids; got shape {tuple(tokens.shape)}.")
        dtype = keras.backend.standardize_dtype(tokens.dtype)
        if "int" not in dtype:
            raise TypeError(f"`tokens` must be integer token ids; got dtype {dtype}.")
        values = _concrete(tokens)
        if values is not None and values.size:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"`tokens` must be in [0, {self.config.vocab_size}) (the vocabulary); got ids from "
                                 f"{low} to {high}.")
        return tokens

    def _check_state(self, state):
        if state is None:
            return
        if not isinstance(state, (list, tuple)) or len(state) != self.config.n_layer or not all(
                isinstance(s, (list, tuple)) and len(s) == 3 for s in state):
            raise ValueError(f"`state` must be a list of {self.config.n_layer} (time-mix shift, WKV state, "
                             f"channel-mix shift) tuples, as call_with_state returns, or None.")

    def call_with_state(self, tokens, state=None):
        """tokens (B, T) ints -> (logits (B, T, vocab) float32, the state after the last token).
        state None: the start state (zero shifts, WKV state `time_state` of every layer)."""
        tokens = self._check_tokens(tokens)
        self._check_state(state)
        x = self.ln0(self.emb(tokens))
        new_state = []
        for i, block in enumerate(self.blocks):
            x, block_state = block(x, None if state is None else tuple(state[i]))
            new_state.append(block_state)
        return ops.cast(self.head(self.ln_out(x)), "float32"), new_state

    def call(self, tokens):
        """tokens (B, T) ints -> logits (B, T, vocab) float32 (what fit and predict use)."""
        return self.call_with_state(tokens)[0]

    def initial_state(self, batch_size):
        """The start state as NumPy arrays: what state=None means, for `batch_size` rows."""
        C = self.config.n_embd
        return [(np.zeros((batch_size, C), np.float32),
                 np.repeat(ops.convert_to_numpy(s.value)[None], batch_size, axis=0).astype(np.float32),
                 np.zeros((batch_size, C), np.float32)) for s in self.start_states]

    def generate(self, prompt_tokens, max_new_tokens, temperature=1.0, top_p=1.0, seed=None, on_tokens=None):
        """Samples `max_new_tokens` tokens after each prompt; see generation.generate."""
        from .generation import generate

        return generate(self, prompt_tokens, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        on_tokens=on_tokens)

    def get_config(self):
        base = super().get_config()
        return {"name": base.get("name"), "dtype": base.get("dtype"), "trainable": base.get("trainable", True),
                "config": self.config.to_dict()}
