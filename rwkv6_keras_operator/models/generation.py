"""Generation with RWKV6: prefill each prompt in one call, then one token at a time (T = 1) carrying the state.

Prompts of different lengths: the rows of one length are prefilled together in one call (one call per distinct
length), their states are put back in row order, and every row then decodes in one batch. Sampling runs on the
host in NumPy: temperature (0: greedy), then nucleus (top_p), from a seeded generator.
"""
import keras
import numpy as np
from keras import ops


def compiled_call(model):
    """fn(tokens, state) -> (logits, state): model.call_with_state compiled where the backend compiles (jax.jit
    over the variables' current values, tf.function), eager without autograd under torch. Token ids are checked
    before each call. Made once per model (each new input shape compiles once)."""
    call = getattr(model, "_compiled_call", None)
    if call is None:
        call = model._compiled_call = _compile(model)
    return call


def _compile(model):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def pure(values, tokens, state):
            with keras.StatelessScope(state_mapping=list(zip(model.variables, values))):
                return model.call_with_state(tokens, state)

        jitted = jax.jit(pure)

        def call(tokens, state):
            return jitted([v.value for v in model.variables], model._check_tokens(tokens), state)
    elif backend == "tensorflow":
        import tensorflow as tf

        traced = tf.function(model.call_with_state, reduce_retracing=True)

        def call(tokens, state):
            return traced(model._check_tokens(tokens), state)
    elif backend == "torch":
        import torch

        def call(tokens, state):
            with torch.no_grad():
                return model.call_with_state(tokens, state)
    else:
        call = model.call_with_state
    return call


def _prompts(prompt_tokens):
    """(list of 1-D int arrays, whether one prompt was given as a flat sequence)."""
    if hasattr(prompt_tokens, "shape"):                      # a NumPy array or a backend tensor
        array = prompt_tokens if isinstance(prompt_tokens, np.ndarray) else ops.convert_to_numpy(prompt_tokens)
        if array.ndim == 1:
            return [array], True
        if array.ndim == 2:
            return list(array), False
        raise ValueError(f"`prompt_tokens` must be one prompt (T,) or a batch (B, T); got shape {array.shape}.")
    rows = list(prompt_tokens)
    if rows and all(np.ndim(x) == 0 for x in rows):
        return [np.asarray(rows)], True
    return [np.asarray(row) for row in rows], False


def sample(logits, temperature=1.0, top_p=1.0, rng=None):
    """One token id per row of `logits` (B, V): greedy when temperature == 0, else from softmax(logits /
    temperature) restricted to the smallest set of most likely tokens whose probability reaches top_p."""
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    rng = rng if rng is not None else np.random.default_rng()
    z = logits / temperature
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=-1)
        keep_ranked = np.cumsum(ranked, axis=-1) - ranked < top_p      # the most likely token is always kept
        keep = np.zeros_like(keep_ranked)
        np.put_along_axis(keep, order, keep_ranked, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random((len(probs), 1)) * cdf[:, -1:]
    return np.minimum((cdf <= draws).sum(axis=-1), probs.shape[-1] - 1)


def _check(max_new_tokens, temperature, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be an int >= 0; got {max_new_tokens!r}.")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0: greedy); got {temperature!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1]; got {top_p!r}.")


def prefill(model, prompts, call=None):
    """Runs every prompt (a list of 1-D int arrays, each at least one token) from the start state, rows of one
    length in one call. Returns (logits at each prompt's last token (B, V) NumPy, the state in row order)."""
    call = call or compiled_call(model)
    by_length = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    order, last_logits, states = [], [], []
    for length, rows in by_length.items():
        tokens = np.stack([prompts[row] for row in rows]).astype(np.int32)
        logits, state = call(tokens, model.initial_state(len(rows)))
        last_logits.append(ops.convert_to_numpy(logits[:, -1]))
        states.append(state)
        order.extend(rows)
    last_logits = np.concatenate(last_logits)
    if len(states) == 1:
        return last_logits, states[0]
    inverse = np.argsort(np.asarray(order))                   # row b's entry in the grouped order
    inverse_tensor = ops.convert_to_tensor(inverse.astype(np.int32))
    state = [tuple(ops.take(ops.concatenate([s[i][p] for s in states], axis=0), inverse_tensor, axis=0)
                   for p in range(3)) for i in range(model.config.n_layer)]
    return last_logits[inverse], state


def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_p=1.0, seed=None, on_tokens=None):
    """Samples `max_new_tokens` tokens after each prompt.

    prompt_tokens: one prompt (a flat list / 1-D array of ids) or a batch (a 2-D array, or a list of lists of
        different lengths); every prompt needs at least one token.
    temperature: 0 picks the most likely token; top_p: nucleus sampling; seed: for the NumPy generator.
    on_tokens: called after each step with the new ids (B,) (e.g. to print them as they come).
    Returns the new ids: (max_new_tokens,) for one flat prompt, else (B, max_new_tokens), int64.
    """
    _check(max_new_tokens, temperature, top_p)
    prompts, single = _prompts(prompt_tokens)
    if not prompts:
        raise ValueError("`prompt_tokens` holds no prompt.")
    for b, prompt in enumerate(prompts):
        if prompt.ndim != 1 or len(prompt) == 0:
            raise ValueError(f"prompt {b} must be a non-empty sequence of token ids; got shape {prompt.shape}.")
        model._check_tokens(prompt[None])
    rng = np.random.default_rng(seed)
    new = np.zeros((len(prompts), max_new_tokens), np.int64)
    if max_new_tokens:
        call = compiled_call(model)
        logits, state = prefill(model, prompts, call)
        for step in range(max_new_tokens):
            tokens = sample(logits, temperature, top_p, rng)
            new[:, step] = tokens
            if on_tokens is not None:
                on_tokens(tokens.copy())
            if step + 1 < max_new_tokens:
                out, state = call(tokens[:, None].astype(np.int32), state)
                logits = ops.convert_to_numpy(out[:, -1])
    return new[0] if single else new
