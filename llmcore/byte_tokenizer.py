"""A tokenizer-free stand-in: the UTF-8 bytes of a text as token ids, for models without
a tokenizer (random-weight presets, byte-level models)."""

from __future__ import annotations


class ByteTokenizer:
    """Token id = UTF-8 byte value modulo ``vocab_size`` (so any vocabulary of at least
    one token works; ids are exact bytes when ``vocab_size >= 256``)."""

    eos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int = 256):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """The text's bytes as ids; an empty text gives one token (0), so a prompt is
        never empty."""
        return [b % self.vocab_size for b in text.encode()] or [0]

    def decode(self, ids) -> str:
        """Ids below 256 as bytes (invalid UTF-8 becomes U+FFFD); larger ids are skipped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode(errors="replace")
