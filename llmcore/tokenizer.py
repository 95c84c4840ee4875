"""Training a byte-level BPE tokenizer with the ``tokenizers`` library.

The saved directory holds ``tokenizer.json`` (read by :func:`load_tokenizer` and by
transformers' ``PreTrainedTokenizerFast``) and ``tokenizer_config.json`` with the special
tokens and a simple default chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in a tokenizer trained here

# A plain template for models trained here: role headers, the eos token ends each turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | os.PathLike,
                    min_frequency: int = 2, length: int | None = None,
                    show_progress: bool = True, model_max_length: int = 2048) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it into directory ``out``.

    Byte-level: every byte has a token, so any input encodes (no unknown token) and
    decoding is lossless. ``vocab_size`` counts the 256 byte tokens, the merges and the
    three special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` (ids 0, 1, 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or not 256 + len(SPECIAL_TOKENS) <= vocab_size <= 2**31:
        raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} (the byte "
                         f"alphabet and special tokens), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
              "eos_token": EOS, "pad_token": PAD, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "chat_template": DEFAULT_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")
    return out


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 of a tokenizer directory's ``tokenizer.json`` (what shards are keyed by)."""
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found")
    return hashlib.sha256(f.read_bytes()).hexdigest()


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 byte length of each token id of a byte-level BPE tokenizer (0 for special
    tokens): what bits-per-byte counts per predicted token."""
    tk = getattr(tokenizer, "tokenizer", tokenizer)
    special = {t.content for t in tk.get_added_tokens_decoder().values()}
    out = []
    for i in range(tk.get_vocab_size()):
        s = tk.id_to_token(i)
        out.append(0 if s is None or s in special else len(s))
    return out


from llmcore.models.hf import HFTokenizer, load_tokenizer  # noqa: E402,F401  MERGE-TEMP
