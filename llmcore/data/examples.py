"""Rows for post-training: instruction (SFT) and preference sets, read, checked and
tokenised.

Formats (JSONL, one object per line, or Parquet with the same columns):

* SFT: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
  (roles system / user / assistant; the loss is on the assistant turns).
* Preference: ``{"prompt": str, "chosen": str, "rejected": str}``; other fields (such as
  the stdlib set's ``corruption``) are kept as labels.

Rendering: with a chat template (a tokenizer trained here has one), a prompt/response row
is the conversation [user: prompt, assistant: response]; each assistant turn is the text
the template adds for it (its content, the end-of-sequence token and what follows), found
by rendering the conversation with and without the turn. Without a template, the prompt
text is followed by the response text and the end-of-sequence token. Text outside the
assistant turns is tokenised piece by piece, so the loss mask is exact at the token level.

A row that is not usable — a missing or non-string field, an empty response, a prompt that
leaves no room for the answer within ``max_len`` tokens — raises :class:`BadRowError`
naming the file and line; with ``skip_bad_rows`` it is counted and skipped instead.
Answers longer than the room left are cut at ``max_len`` (counted as ``truncated``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmcore.data.corpus import split_of

KINDS = ("sft", "preference")
ROLES = ("system", "user", "assistant")


class BadRowError(ValueError):
    """A row that cannot be used; the message names the file and line."""


@dataclass
class Row:
    where: str  # path:line
    data: dict


def _raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRowError(f"{path}:{i}: not valid JSON ({e.msg})")


def _text(row: dict, key: str, where: str, empty_ok: bool = False) -> str:
    if key not in row:
        raise BadRowError(f"{where}: missing field {key!r}")
    v = row[key]
    if not isinstance(v, str):
        raise BadRowError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not empty_ok and not v.strip():
        raise BadRowError(f"{where}: field {key!r} is empty")
    return v


def check_row(row: object, kind: str, where: str) -> dict:
    """``row`` checked as a ``kind`` row; raises :class:`BadRowError` naming ``where``."""
    if isinstance(row, BadRowError):
        raise row
    if not isinstance(row, dict):
        raise BadRowError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if kind == "preference":
        _text(row, "prompt", where, empty_ok=True)
        if _text(row, "chosen", where) == _text(row, "rejected", where):
            raise BadRowError(f"{where}: 'chosen' and 'rejected' are identical")
        return row
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRowError(f"{where}: field 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise BadRowError(f"{where}: messages[{j}] must be {{'role': one of {ROLES}, "
                                  "'content': str}")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise BadRowError(f"{where}: no assistant message with content (nothing to learn)")
        return row
    if "prompt" not in row and "response" not in row:
        raise BadRowError(f"{where}: needs 'prompt' and 'response', or 'messages'")
    _text(row, "prompt", where, empty_ok=True)
    _text(row, "response", where)
    return row


def read_rows(paths: str | os.PathLike | Sequence[str | os.PathLike], kind: str,
              skip_bad_rows: bool = False, stats: Counter | None = None) -> list[Row]:
    """Every row of ``paths`` (JSONL / Parquet files, or folders of them), checked.

    ``stats`` (a Counter) receives ``rows`` and ``skipped``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    stats = stats if stats is not None else Counter()
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.suffix in (".jsonl", ".parquet")) \
            if p.is_dir() else [p]
        if not files or not files[0].exists():
            raise FileNotFoundError(f"{p}: no such file (or no .jsonl/.parquet in the folder)")
        for f in files:
            for i, raw in _raw_rows(f):
                where = f"{f}:{i}"
                try:
                    out.append(Row(where, check_row(raw, kind, where)))
                except BadRowError:
                    if not skip_bad_rows:
                        raise
                    stats["skipped"] += 1
    stats["rows"] += len(out)
    return out


def row_split(row: dict, val_fraction: float) -> str:
    """"train" or "val" for a row, by a hash of its content (for sets without a split)."""
    return split_of(json.dumps(row, sort_keys=True, ensure_ascii=False), val_fraction)


def files_hash(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 over the names and contents of data files (what caches are keyed by)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- tokenising

@dataclass
class Encoded:
    """A tokenised sequence: ``ids`` and ``mask`` (1 where the token is an answer token
    that the loss counts)."""

    ids: list[int]
    mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    labels: dict = field(default_factory=dict)  # extra fields of the row (e.g. corruption)


class Renderer:
    """Turns rows into token ids and loss masks with ``tokenizer`` (see the module doc)."""

    def __init__(self, tokenizer, max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.tok, self.max_len = tokenizer, max_len
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def _pieces(self, messages: list[dict], where: str) -> list[tuple[str, int]]:
        """(text, is_answer) pieces of a conversation."""
        if not self.template:
            prompt = "".join(m["content"] for m in messages if m["role"] != "assistant")
            answer = "".join(m["content"] for m in messages if m["role"] == "assistant")
            return [(prompt, 0), (answer, 1)]
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.tok.apply_chat_template(messages[:i], add_generation_prompt=True)
            after = self.tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise BadRowError(f"{where}: the chat template does not render the "
                                  "conversation incrementally; cannot mask the answers")
            pieces += [(before[len(done):], 0), (after[len(before):], 1)]
            done = after
        return pieces

    def encode(self, messages: list[dict], where: str = "row") -> Encoded:
        """Ids and loss mask of a conversation, cut to ``max_len`` tokens."""
        ids: list[int] = []
        mask: list[int] = []
        for text, answer in self._pieces(messages, where):
            t = self._enc(text)
            ids += t
            mask += [answer] * len(t)
        if not self.template and self.eos is not None:
            ids.append(self.eos)
            mask.append(1)
        first = mask.index(1) if 1 in mask else len(mask)
        if first >= self.max_len:
            raise BadRowError(f"{where}: the prompt is {first} tokens, which leaves no room "
                              f"for the answer within {self.max_len} tokens (seq_len)")
        cut = len(ids) > self.max_len
        return Encoded(ids[:self.max_len], mask[:self.max_len], cut)

    def sft(self, row: Row) -> Encoded:
        d = row.data
        msgs = d["messages"] if "messages" in d else [
            {"role": "user", "content": d["prompt"]},
            {"role": "assistant", "content": d["response"]}]
        return self.encode(msgs, row.where)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a generation starts from for ``prompt`` (the template's generation
        prompt, or the bare text)."""
        if self.template:
            return self._enc(self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True))
        return self._enc(prompt)

    def pair(self, row: Row) -> EncodedPair:
        d = row.data
        user = {"role": "user", "content": d["prompt"]}
        chosen = self.encode([user, {"role": "assistant", "content": d["chosen"]}], row.where)
        rejected = self.encode([user, {"role": "assistant", "content": d["rejected"]}],
                               row.where)
        labels = {k: v for k, v in d.items() if k not in ("prompt", "chosen", "rejected")
                  and isinstance(v, (str, int, float, bool))}
        return EncodedPair(chosen, rejected, labels)


def encode_rows(rows: Sequence[Row], renderer: Renderer, kind: str,
                skip_bad_rows: bool = False, stats: Counter | None = None) -> list:
    """Encoded (SFT) or EncodedPair (preference) rows; ``stats`` counts ``skipped``,
    ``truncated`` and ``identical_after_cut`` (pairs that differ only past ``max_len``,
    dropped: they carry no preference)."""
    stats = stats if stats is not None else Counter()
    out = []
    for row in rows:
        try:
            e = renderer.sft(row) if kind == "sft" else renderer.pair(row)
        except BadRowError:
            if not skip_bad_rows:
                raise
            stats["skipped"] += 1
            continue
        cut = e.truncated if kind == "sft" else (e.chosen.truncated or e.rejected.truncated)
        stats["truncated"] += bool(cut)
        if kind == "preference" and e.chosen.ids == e.rejected.ids:
            stats["identical_after_cut"] += 1  # they differed only past max_len
            continue
        out.append(e)
    return out


__all__ = ["BadRowError", "Encoded", "EncodedPair", "KINDS", "Renderer", "Row", "check_row",
           "encode_rows", "files_hash", "read_rows", "row_split"]
