"""Tokenizers: loading those of Hugging Face model directories (a ``tokenizers.Tokenizer``
with the directory's special-token ids and its chat template, rendered with jinja2 in a
sandbox), and training byte-level BPE tokenizers for models trained here.

Needs the ``tokenizers`` library (and ``jinja2`` for chat templates); nothing here reads
weights, so trainers and data tools can use it without a model. A trained tokenizer is
saved as ``tokenizer.json`` (read by :func:`load_tokenizer` and by transformers'
``PreTrainedTokenizerFast``) plus ``tokenizer_config.json`` with the special tokens and a
simple default chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the directory's special tokens and chat template."""

    def __init__(self, tokenizer, config: dict | None = None, generation_config: dict | None = None,
                 model_config: dict | None = None):
        self.tokenizer = tokenizer
        self._compiled: dict = {}  # (template, strict) -> compiled jinja template
        self.config = config or {}
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        gen, mod = generation_config or {}, model_config or {}
        for kind in ("bos", "eos", "pad"):
            tok = self._token_str(self.config.get(f"{kind}_token"))
            setattr(self, f"{kind}_token", tok)
            tid = self.tokenizer.token_to_id(tok) if tok is not None else None
            if tid is None:
                tid = gen.get(f"{kind}_token_id", mod.get(f"{kind}_token_id"))
                if isinstance(tid, list):
                    tid = tid[0] if tid else None
            setattr(self, f"{kind}_token_id", tid)
        if self.eos_token is None and self.eos_token_id is not None:
            self.eos_token = self.tokenizer.id_to_token(self.eos_token_id)
        if self.bos_token is None and self.bos_token_id is not None:
            self.bos_token = self.tokenizer.id_to_token(self.bos_token_id)

    @staticmethod
    def _token_str(t):
        if isinstance(t, dict):
            return t.get("content")
        return t

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs):
        """Render ``messages`` with the chat template (a string, or ids if ``tokenize``)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json)")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from None

        def raise_exception(msg):
            raise ValueError(f"chat template error: {msg}")

        strict = bool(kwargs.pop("strict", False))
        key = (self.chat_template, strict)
        template = self._compiled.get(key)
        if template is None:  # compiling costs ~40 ms: once per template, not per call
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                undefined=jinja2.StrictUndefined
                                                if strict else jinja2.Undefined)
            env.globals["raise_exception"] = raise_exception
            env.filters.setdefault("tojson", lambda x, **kw: json.dumps(x, **kw))
            template = self._compiled[key] = env.from_string(self.chat_template)
        text = template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(path) -> HFTokenizer:
    """The tokenizer of a local directory (tokenizer.json, via the ``tokenizers`` library)."""
    from tokenizers import Tokenizer

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{tj} not found (only the fast tokenizer.json format is "
                                "supported)")
    opt = {}
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
        f = path / name
        try:
            opt[name] = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from None
    return HFTokenizer(Tokenizer.from_file(str(tj)), opt["tokenizer_config.json"],
                       opt["generation_config.json"], opt["config.json"])


# A tokenizer-free stand-in for models without a tokenizer (random-weight presets,
# byte-level models): the UTF-8 bytes of a text as token ids.
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


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
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
