"""Training, evaluation and generation for the demo model (any Keras backend)."""
import math
from dataclasses import dataclass

import keras
import numpy as np

from ..reference import relative_error
from .model import RWKV6LM


@dataclass(frozen=True)
class Vocab:
    """Characters <-> ids."""

    chars: str

    @classmethod
    def of(cls, text):
        return cls("".join(sorted(set(text))))

    def encode(self, text):
        index = {c: i for i, c in enumerate(self.chars)}
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def __len__(self):
        return len(self.chars)


def unigram_entropy(ids, vocab_size):
    """Entropy of the token frequencies, in nats: the loss of the best model that ignores context."""
    p = np.bincount(ids, minlength=vocab_size) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def windows(ids, count, length, rng):
    """`count` random windows of length+1 tokens: inputs [:, :-1], targets [:, 1:]."""
    starts = rng.integers(0, len(ids) - length - 1, count)
    return np.stack([ids[s:s + length + 1] for s in starts])


def build_model(vocab_size, d_model=128, n_layer=2, head_size=32, lr=3e-3, total_steps=300):
    model = RWKV6LM(vocab_size, d_model=d_model, n_layer=n_layer, head_size=head_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        lr / 10, max(total_steps, 1), alpha=0.1, warmup_target=lr, warmup_steps=max(total_steps // 20, 1))
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(np.zeros((1, 2), np.int32))  # build the weights
    return model


def sample(logits, temperature, rng):
    """One token id from the last position's logits (temperature 0: the most likely one)."""
    logits = np.asarray(logits, np.float64).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(logits))
    p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def run(model, tokens, state=None):
    """Logits (T, vocab) of a 1-D token sequence and the state after it, starting from `state` (None: zeros).

    One call for the whole sequence (T = len(tokens)), compiled by Keras' predict function (jax.jit,
    tf.function; eager under torch). Logits and state come back as NumPy arrays."""
    tokens = np.asarray(tokens, np.int32).reshape(1, -1)
    logits, state = model.predict_on_batch((tokens, model.initial_state(1) if state is None else state))
    return logits[0], state


def step(model, token, state):
    """Feed one token (T = 1) with the carried state: logits (vocab,) and the new state."""
    logits, state = run(model, [token], state)
    return logits[-1], state


def generate(model, prompt_ids, n_new, temperature=0.7, seed=0):
    """Prefill the prompt in one call, then generate n_new tokens one at a time from the carried state."""
    rng = np.random.default_rng(seed)
    logits, state = run(model, prompt_ids)
    last = logits[-1]
    out = []
    for _ in range(n_new):
        out.append(sample(last, temperature, rng))
        last, state = step(model, out[-1], state)
    return out


def consistency(model, ids, prefill):
    """The operator's state carries everything: three ways to compute the logits of `ids` agree.

    Returns relative L2 errors against the full-sequence forward (one call over all of ids):
        stepwise: one token per call (T = 1), state in and out;
        prefill:  ids[:prefill] in one call, then the rest one token per call from its final state;
        state:    the final WKV states of the stepwise run against the full-sequence run's.
    """
    full, full_state = run(model, ids)
    state, stepwise = None, []
    for token in ids:
        logits, state = step(model, token, state)
        stepwise.append(logits)
    continued, prefill_state = run(model, ids[:prefill])
    continued = list(continued)
    for token in ids[prefill:]:
        logits, prefill_state = step(model, token, prefill_state)
        continued.append(logits)
    wkv = lambda s: np.concatenate([np.ravel(block[1]) for block in s])  # noqa: E731
    return {"stepwise": relative_error(stepwise, full), "prefill": relative_error(continued, full),
            "state": relative_error(wkv(state), wkv(full_state))}


def nats_to_bits(nats):
    return nats / math.log(2)
