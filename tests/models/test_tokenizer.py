"""The World tokenizer against the official one (`rwkv.rwkv_tokenizer`, pure Python, no torch) on sample text."""
import numpy as np
import pytest

from rwkv6_keras_operator.models.tokenizer import WorldTokenizer

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.\n\n",
    "  indented\tline\r\nwith   runs of    spaces and ----- dashes ===== and ######## hashes",
    "Déjà vu: naïve café, Straße, ¿qué? ¡sí! — “quotes” … 1.5×10⁻³ ±0.2 °C",
    "中文：我们在北京。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "emoji 🙂👍🏽 🇫🇷 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \x00 control \x07 chars",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def official():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    import os

    import rwkv

    return rwkv_tokenizer.TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_the_official_tokenizer(tokenizer, official, text):
    assert tokenizer.encode(text) == official.encode(text)


def test_random_text_and_bytes(tokenizer, official):
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in (*range(32, 127), *range(0xA0, 0x250), *range(0x4E00, 0x4E80), 0x1F600, 0x1F680)]
    for _ in range(20):
        text = "".join(rng.choice(alphabet, rng.integers(1, 200)))
        assert tokenizer.encode(text) == official.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    data = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()       # not valid UTF-8
    ids = tokenizer.encode_bytes(data)
    assert ids == official.encodeBytes(data)
    assert tokenizer.decode_bytes(ids) == data


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary(tokenizer):
    assert len(tokenizer) == 65530                              # 65,529 entries and the end-of-text id 0
    assert tokenizer.vocab_size == 65530
    assert tokenizer.decode([0]) == ""
    assert len(tokenizer.encode("the the the the")) < len("the the the the")


def test_stream_decoder_joins_characters_cut_between_tokens(tokenizer):
    text = "日本語 🙂 ok"
    ids = tokenizer.encode_bytes(text.encode("utf-8")[:2]) + tokenizer.encode_bytes(text.encode("utf-8")[2:])
    decode = tokenizer.stream_decoder()
    pieces = [decode([i]) for i in ids]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([70000], errors="strict")
    h = tokenizer.encode("H")
    assert tokenizer.decode(h + [65533] + h) == "H\ufffdH"             # 65533: a model row, no vocabulary entry
    with pytest.raises(TypeError, match="must be a str"):
        tokenizer.encode(b"bytes")
