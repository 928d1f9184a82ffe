"""python -m rwkv6_keras_operator generate: loads a checkpoint, streams the continuation of a prompt."""
import numpy as np
import pytest

from rwkv6_keras_operator.cli import main
from rwkv6_keras_operator.models import RWKV6, RWKV6Config
from rwkv6_keras_operator.models.checkpoint import random_weights, write_checkpoint
from rwkv6_keras_operator.models.tokenizer import WorldTokenizer

from .conftest import needs_safetensors

# The World vocabulary's size (65,536 rows, as the released models): any prompt's ids fit.
WORLD = RWKV6Config(vocab_size=65536, n_embd=32, n_layer=1, head_size=16, dim_ffn=64, mix_lora=2, decay_lora=4)


@pytest.fixture(scope="module")
def world_checkpoint(tmp_path_factory):
    needs_safetensors()
    path = tmp_path_factory.mktemp("world") / "tiny_world.safetensors"
    return write_checkpoint(str(path), random_weights(WORLD, seed=1))


def test_streams_the_same_text_as_generate(world_checkpoint, capsys):
    prompt = "Hello, 世界! The"
    assert main(["generate", "--checkpoint", world_checkpoint, "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    out = capsys.readouterr()
    tokenizer = WorldTokenizer()
    new = RWKV6.from_checkpoint(world_checkpoint).generate(tokenizer.encode(prompt), 12, temperature=0.8,
                                                           top_p=0.9, seed=3)
    assert out.out == prompt + tokenizer.decode(new) + "\n"
    assert "12 tokens in" in out.err
    assert len(np.unique(new)) > 1


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["generate", "--checkpoint", str(tmp_path / "nothing.pth"), "--prompt", "x"])
