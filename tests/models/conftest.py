"""Checkpoints with random weights in the official layout, and the official runtime's outputs on them (computed
once per test session in a subprocess, see official.py). The official runtime is the `rwkv` pip package
(scripts/test.sh installs it); where it is missing, the tests that need it are skipped, saying so."""
import contextlib
import importlib.util

import keras
import numpy as np
import pytest

from rwkv6_keras_operator.models import RWKV6Config
from rwkv6_keras_operator.models.checkpoint import random_weights, write_checkpoint

from .official import run_official

# Small configurations (2 CPU cores in CI); vocabularies that are not multiples of 64; head sizes 16, 32, 64.
CONFIGS = {
    "c64_h16": (RWKV6Config(vocab_size=1000, n_embd=64, n_layer=2, head_size=16, dim_ffn=224, mix_lora=8,
                            decay_lora=16), False),
    "c128_h32_state": (RWKV6Config(vocab_size=517, n_embd=128, n_layer=2, head_size=32, dim_ffn=448, mix_lora=16,
                                   decay_lora=32), True),
    "c128_h64_state": (RWKV6Config(vocab_size=301, n_embd=128, n_layer=1, head_size=64, dim_ffn=256, mix_lora=4,
                                   decay_lora=8), True),
}
# Two rows, fed in calls of these lengths (T = 1 first, a length that is no multiple of a chunk, T = 1 again),
# and the same 27 tokens in one call.
CALL_LENGTHS = (1, 19, 1, 6)
ROWS = 2


class Case:
    """One configuration: its checkpoint files, the tokens, and the official outputs."""

    def __init__(self, name, config, time_state, directory):
        self.name, self.config, self.time_state = name, config, time_state
        self.weights = random_weights(config, seed=len(name), time_state=time_state)
        self.pth = write_checkpoint(str(directory / f"{name}.pth"), self.weights)
        self.safetensors = (write_checkpoint(str(directory / f"{name}.safetensors"), self.weights)
                            if importlib.util.find_spec("safetensors") else None)
        rng = np.random.default_rng(7)
        self.tokens = rng.integers(0, config.vocab_size, (ROWS, sum(CALL_LENGTHS)), dtype=np.int32)
        bounds = np.cumsum((0,) + CALL_LENGTHS)
        self.chunks = [self.tokens[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def jobs(self):
        """Per row: the chunked sequence, then the whole one."""
        sequences = []
        for row in range(ROWS):
            sequences.append([chunk[row].tolist() for chunk in self.chunks])
            sequences.append([self.tokens[row].tolist()])
        return {"checkpoint": self.pth, "sequences": sequences}

    def official(self, results):
        """(logits of the one call (B, T, V), [per call: logits (B, T_c, V)], [per call: state per layer,
        batched as (B, ...)])."""
        rows = [results[2 * row] for row in range(ROWS)]
        whole = np.stack([results[2 * row + 1]["logits"][0] for row in range(ROWS)])
        calls = [np.stack([seq["logits"][c] for seq in rows]) for c in range(len(CALL_LENGTHS))]
        states = [[tuple(np.stack([seq["states"][c][i][p] for seq in rows]) for p in range(3))
                   for i in range(self.config.n_layer)] for c in range(len(CALL_LENGTHS))]
        return whole, calls, states


def needs_official_runtime():
    if importlib.util.find_spec("rwkv") is None:
        pytest.skip("the official runtime is not installed: pip install rwkv (scripts/test.sh does)")


def needs_safetensors():
    if importlib.util.find_spec("safetensors") is None:
        pytest.skip("safetensors is not installed: pip install safetensors (scripts/test.sh does)")


@pytest.fixture(scope="session", autouse=True)
def float32_matmuls():
    """Full float32 matrix products (GPUs default to TF32 under jax and tensorflow): the parity tolerance is a
    float32 one. No effect on CPUs."""
    backend = keras.backend.backend()
    with contextlib.ExitStack() as stack:
        if backend == "jax":
            import jax

            stack.enter_context(jax.default_matmul_precision("highest"))
        elif backend == "tensorflow":
            import tensorflow as tf

            was = tf.config.experimental.tensor_float_32_execution_enabled()
            tf.config.experimental.enable_tensor_float_32_execution(False)
            stack.callback(tf.config.experimental.enable_tensor_float_32_execution, was)
        elif backend == "torch":
            import torch

            was = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", was)
        yield


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    """{name: Case} with `.expected` = the official outputs, for every configuration in CONFIGS."""
    needs_official_runtime()
    directory = tmp_path_factory.mktemp("rwkv6_checkpoints")
    built = {name: Case(name, config, time_state, directory) for name, (config, time_state) in CONFIGS.items()}
    results = run_official([case.jobs() for case in built.values()], str(directory))
    for j, case in enumerate(built.values()):
        case.expected = case.official(results[j])
    return built


@pytest.fixture(params=sorted(CONFIGS))
def case(request, cases):
    return cases[request.param]


@pytest.fixture
def official(tmp_path):
    """official(jobs) -> the official runtime's results (see official.run_official)."""
    needs_official_runtime()
    return lambda jobs: run_official(jobs, str(tmp_path))
