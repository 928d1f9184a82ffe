"""generate: prefill then T = 1 steps carrying the state; prompts of different lengths; sampling."""
import numpy as np
import pytest

from rwkv6_keras_operator.models import RWKV6
from rwkv6_keras_operator.models.generation import compiled_call, prefill, sample

from .tolerances import FP32, rel_err, to_numpy

PROMPTS = [[5, 17, 301, 2, 99, 41, 7], [480], [3, 14, 15, 92]]


@pytest.fixture(scope="module")
def model(cases):
    return RWKV6.from_checkpoint(cases["c128_h32_state"].pth)


def test_greedy_follows_the_official_argmax(model, cases, official):
    """Every greedy token is the official runtime's most likely next token along the generated text."""
    new = model.generate(PROMPTS, 6, temperature=0)
    assert new.shape == (3, 6)
    jobs = [{"checkpoint": cases["c128_h32_state"].pth,
             "sequences": [[prompt + new[b].tolist()] for b, prompt in enumerate(PROMPTS)]}]
    results = official(jobs)[0]
    for b, prompt in enumerate(PROMPTS):
        logits = results[b]["logits"][0][len(prompt) - 1:-1]           # the predictions of the new tokens
        chosen = logits[np.arange(6), new[b]]
        assert np.all(chosen >= logits.max(axis=-1) - 1e-4), (b, chosen, logits.max(axis=-1))


def test_batch_of_different_lengths_is_each_prompt_alone(model):
    batch = model.generate(PROMPTS, 5, temperature=0)
    for b, prompt in enumerate(PROMPTS):
        alone = model.generate(prompt, 5, temperature=0)
        assert alone.shape == (5,)
        np.testing.assert_array_equal(batch[b], alone)


def test_prefill_puts_states_back_in_row_order(model):
    logits, state = prefill(model, [np.asarray(p) for p in PROMPTS])
    call = compiled_call(model)
    for b, prompt in enumerate(PROMPTS):
        want_logits, want_state = call(np.asarray([prompt]), model.initial_state(1))
        assert rel_err(logits[b], to_numpy(want_logits)[0, -1]) < FP32
        for ours, theirs in zip(state, want_state):
            for part in range(3):
                assert rel_err(to_numpy(ours[part])[b], to_numpy(theirs[part])[0]) < FP32


def test_compiled_call_matches_eager(model, cases):
    case = cases["c128_h32_state"]
    call = compiled_call(model)
    state_a = state_b = None
    for chunk in case.chunks[:2]:
        a, state_a = call(chunk, model.initial_state(len(chunk)) if state_a is None else state_a)
        b, state_b = model.call_with_state(chunk, state_b)
        assert rel_err(to_numpy(a), to_numpy(b)) < FP32


def test_seeded_sampling(model):
    a = model.generate(PROMPTS, 8, temperature=1.0, top_p=0.9, seed=3)
    b = model.generate(PROMPTS, 8, temperature=1.0, top_p=0.9, seed=3)
    c = model.generate(PROMPTS, 8, temperature=1.0, top_p=0.9, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = model.generate(PROMPTS, 8, temperature=0)
    np.testing.assert_array_equal(model.generate(PROMPTS, 8, top_p=1e-9, seed=5), greedy)   # nucleus of one


def test_on_tokens_streams_every_step(model):
    seen = []
    new = model.generate(np.asarray([[1, 2, 3], [4, 5, 6]]), 4, seed=0, on_tokens=seen.append)
    assert len(seen) == 4
    np.testing.assert_array_equal(np.stack(seen, axis=1), new)
    assert model.generate([1, 2], 0).shape == (0,)


def test_sample_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
    counts = np.bincount(sample(logits, 1.0, 1.0, rng), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    counts = np.bincount(sample(logits, 1.0, 0.7, rng), minlength=4) / 20000       # keeps 0.5 and 0.3
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.015)
    counts = np.bincount(sample(logits, 0.5, 1.0, rng), minlength=4) / 20000       # p^2, renormalised
    np.testing.assert_allclose(counts, np.array([25, 9, 2.25, 0.25]) / 36.5, atol=0.015)
    np.testing.assert_array_equal(sample(logits[:3] * [1, 2, 3, 4], 0), [0, 0, 0])


def test_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1, 2], -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1, 2], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([1, 2], 3, top_p=0)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate([1, model.config.vocab_size], 3)
