"""The RWKV "World" tokenizer (vocabulary rwkv_vocab_v20230424, used by every RWKV-6 World checkpoint).

Text is encoded as UTF-8 bytes, then cut greedily from the left into the longest byte strings of the vocabulary
(every single byte is one, so any text encodes). The vocabulary ships with this package (see
VOCABULARY_NOTICE.md: an unmodified copy of the `rwkv` package's file, Apache-2.0), so no download and no other
package is needed.

    tokenizer = WorldTokenizer()
    ids = tokenizer.encode("Hello, 世界")
    text = tokenizer.decode(ids)
"""
import ast
import codecs
import os

VOCABULARY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rwkv_vocab_v20230424.txt")
END_OF_TEXT = 0  # id 0 is not in the file: the World models' end-of-text / document separator


class WorldTokenizer:
    """Greedy longest-match byte tokenizer over an RWKV vocabulary file (default: the World vocabulary)."""

    def __init__(self, vocabulary_file=VOCABULARY_FILE):
        self._bytes = {END_OF_TEXT: b""}
        self._ids = {}
        with open(vocabulary_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                try:
                    first, last = line.index(" "), line.rindex(" ")
                    token_id, length = int(line[:first]), int(line[last + 1:])
                    token = ast.literal_eval(line[first + 1:last])
                except (ValueError, SyntaxError):
                    raise ValueError(f"{vocabulary_file}, line {number}: expected '<id> <literal> <length>'; "
                                     f"got {line[:80]!r}") from None
                token = token.encode("utf-8") if isinstance(token, str) else token
                if not isinstance(token, bytes) or len(token) != length or not token:
                    raise ValueError(f"{vocabulary_file}, line {number}: the token does not have {length} bytes.")
                self._bytes[token_id] = token
                self._ids[token] = token_id
        # Every proper prefix of a token: the longest-match walk goes on while the bytes so far are one.
        self._prefixes = {token[:n] for token in self._ids for n in range(1, len(token))}
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in self._ids]
        if missing:
            raise ValueError(f"{vocabulary_file} lacks single-byte tokens (e.g. {missing[0]!r}): not every text "
                             f"could be encoded.")
        self.vocab_size = max(self._bytes) + 1

    def encode_bytes(self, data):
        """bytes -> token ids, the longest vocabulary entry first at every position."""
        data = bytes(data)
        ids, start, end = [], 0, len(data)
        tokens, prefixes = self._ids, self._prefixes
        while start < end:
            best, stop = start + 1, start + 1
            while stop <= end:
                piece = data[start:stop]
                if piece in tokens:
                    best = stop
                if piece not in prefixes:
                    break
                stop += 1
            ids.append(tokens[data[start:best]])
            start = best
        return ids

    def encode(self, text):
        """str -> token ids (of its UTF-8 bytes)."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; got {type(text).__name__} (use encode_bytes for bytes).")
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids, errors="strict"):
        """token ids -> bytes. An id that is not in the vocabulary raises (errors="strict") or becomes U+FFFD
        (errors="replace"; models have a few more rows than the vocabulary has entries, e.g. 65536)."""
        pieces = []
        for i in ids:
            piece = self._bytes.get(int(i))
            if piece is None:
                if errors != "replace":
                    raise ValueError(f"token id {int(i)} is not in the vocabulary (ids 0 to "
                                     f"{self.vocab_size - 1}).")
                piece = "\ufffd".encode("utf-8")
            pieces.append(piece)
        return b"".join(pieces)

    def decode(self, ids, errors="replace"):
        """token ids -> str; bytes that are not valid UTF-8 (a character cut between tokens) and, with
        errors="replace", ids that are not in the vocabulary become U+FFFD."""
        return self.decode_bytes(ids, errors=errors).decode("utf-8", errors=errors)

    def stream_decoder(self):
        """A function ids -> the text they complete: for printing tokens as they come (a character whose bytes
        span several tokens appears once all of them are there; unknown ids and invalid bytes give U+FFFD)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(ids, final=False):
            """The text that `ids` complete; final=True also flushes an incomplete character (as U+FFFD)."""
            return decoder.decode(self.decode_bytes(ids, errors="replace"), final=final)

        return feed

    def __len__(self):
        return len(self._bytes)
