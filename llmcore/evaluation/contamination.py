"""Contamination check: which evaluation items share an n-gram with the training data.

Each evaluation item becomes a sequence of units, and every run of ``n`` consecutive units
(13 by default, as GPT-3's decontamination) is an n-gram of the item. The training data is
streamed once; an item is **contaminated** when at least ``min_fraction`` of its n-grams
(by default: any one) also occur in it. Units are tokens when a tokenizer is given (the
only choice for token shards, which hold nothing else) or words otherwise: lower-cased runs
of letters and digits, so punctuation and spacing do not hide a copy. An item shorter than
``n`` units has no n-gram and is reported as too short, not as clean.

Matching is exact and vectorised: each n-gram is hashed (two polynomial hashes modulo
primes below 2^31, combined into one 62-bit key; a false match is about as likely as
2^-62 per pair) and the training windows are looked up with ``torch.isin``, chunk by
chunk, so shards of any size stream through bounded memory.

Item texts: for JSONL rows, the string fields that hold the task (``question``,
``choices``, ``prompt``, ``instruction``, ``input``, ``response``, ``output``, ``chosen``,
``rejected``, ``text``, ``answer``) joined by newlines; a multiple-choice row contributes
its question and the right choice. Any other file is one item.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from llmcore.data.jsonl import iter_jsonl

TEXT_FIELDS = ("question", "prompt", "instruction", "input", "response", "output", "chosen",
               "rejected", "text", "completion")
_P1, _B1 = 2_147_483_629, 1_000_003
_P2, _B2 = 2_147_483_587, 999_983
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters, digits and underscores."""
    return _WORD.findall(text.lower())


def _row_text(row: dict) -> str:
    parts = [row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str)]
    ch, ans = row.get("choices"), row.get("answer")
    if isinstance(ch, list) and all(isinstance(c, str) for c in ch):
        if isinstance(ans, str) and len(ans) == 1 and ans.upper().isalpha():
            ans = ord(ans.upper()) - ord("A")
        if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(ch):
            parts.append(ch[ans])
    elif isinstance(ans, str):
        parts.append(ans)
    return "\n".join(parts)


def read_eval_items(paths: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """(id, text) of every item of the given files (``path:line`` for JSONL rows)."""
    items = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"evaluation file {path} does not exist")
        if path.suffix != ".jsonl":
            items.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
            continue
        for i, row in iter_jsonl(path):
            text = _row_text(row)
            if not text:
                raise ValueError(f"{path}:{i}: no text field (one of {TEXT_FIELDS}, or "
                                 "choices with an answer)")
            items.append((f"{path}:{i}", text))
    if not items:
        raise ValueError("no evaluation items")
    return items


def ngram_keys(units: torch.Tensor, n: int) -> torch.Tensor:
    """The 62-bit key of every window of ``n`` units: int64 [len - n + 1] (empty when
    shorter). ``units`` is a 1-D integer tensor of non-negative ids below 2^31."""
    units = units.to(torch.int64)
    m = units.numel() - n + 1
    if m <= 0:
        return torch.empty(0, dtype=torch.int64)
    h1 = torch.zeros(m, dtype=torch.int64)
    h2 = torch.zeros(m, dtype=torch.int64)
    for j in range(n):  # products stay below 2^62: no int64 overflow
        w = units[j:j + m]
        h1 = (h1 * _B1 + w) % _P1
        h2 = (h2 * _B2 + w) % _P2
    return (h1 << 31) | h2


class NgramIndex:
    """The n-grams of a set of evaluation items and which training n-grams hit them."""

    def __init__(self, items: Sequence[Sequence[int]], n: int = 13):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.item_keys = [ngram_keys(torch.as_tensor(list(u), dtype=torch.int64), n)
                          for u in items]
        nonempty = [k for k in self.item_keys if k.numel()]
        self.keys = torch.unique(torch.cat(nonempty)) if nonempty else torch.empty(
            0, dtype=torch.int64)
        self.found = torch.zeros(self.keys.numel(), dtype=torch.bool)
        self.units_read = 0

    def update(self, units: torch.Tensor, chunk: int = 1 << 22) -> None:
        """Mark the item n-grams that occur in ``units`` (1-D ids of one training stream;
        windows never cross from one call into the next)."""
        units = units.reshape(-1)
        self.units_read += units.numel()
        if not self.keys.numel():
            return
        for s in range(0, max(units.numel() - self.n + 1, 0), chunk):
            k = ngram_keys(units[s:s + chunk + self.n - 1], self.n)
            k = k[torch.isin(k, self.keys)]
            if k.numel():
                self.found[torch.searchsorted(self.keys, torch.unique(k))] = True

    def report(self, ids: Sequence[str], min_fraction: float = 0.0) -> list[dict]:
        """Per item: n-grams, matched (how many of them occur in training), fraction,
        contaminated (matched >= 1 and fraction >= ``min_fraction``)."""
        rows = []
        for item_id, k in zip(ids, self.item_keys, strict=True):
            if not k.numel():
                rows.append({"id": item_id, "ngrams": 0, "matched": 0, "fraction": 0.0,
                             "contaminated": False, "too_short": True})
                continue
            hit = int(self.found[torch.searchsorted(self.keys, k)].sum())
            frac = hit / k.numel()
            rows.append({"id": item_id, "ngrams": k.numel(), "matched": hit,
                         "fraction": frac,
                         "contaminated": hit > 0 and frac >= min_fraction,
                         "too_short": False})
        return rows


class _WordIds:
    """Word -> id for the evaluation vocabulary; any other word is one shared id that no
    evaluation n-gram contains."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def add(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids) + 1) for w in words(text)]

    def lookup(self, text: str) -> torch.Tensor:
        return torch.tensor([self.ids.get(w, 0) for w in words(text)], dtype=torch.int64)


def check_contamination(items: Sequence[tuple[str, str]],
                        train: Iterable[str] | Iterable[torch.Tensor], n: int = 13,
                        encode: Callable[[str], list[int]] | None = None,
                        min_fraction: float = 0.0) -> dict:
    """Overlap of ``items`` ((id, text) pairs) with ``train``.

    ``train`` yields texts (documents) or 1-D tensors of token ids (token shards, one
    tensor per split or chunk). With token tensors, ``encode`` must be the tokenizer that
    made them; with texts, units are ``encode``'s tokens when given, else words.

    Returns {"n", "unit", "items", "checked" (items with at least one n-gram), "too_short",
    "contaminated", "rate" (contaminated / checked), "train_units", "rows"} with rows as
    :meth:`NgramIndex.report`.
    """
    if not items:
        raise ValueError("no evaluation items")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    vocab = None if encode is not None else _WordIds()
    units = [encode(t) if encode is not None else vocab.add(t) for _, t in items]
    index = NgramIndex(units, n)
    for doc in train:
        if isinstance(doc, torch.Tensor):
            if encode is None:
                raise ValueError("token ids in the training data need the tokenizer that made "
                                 "them (encode=...)")
            index.update(doc)
        elif encode is not None:
            index.update(torch.tensor(encode(doc), dtype=torch.int64))
        else:
            index.update(vocab.lookup(doc))
    rows = index.report([i for i, _ in items], min_fraction)
    checked = sum(not r["too_short"] for r in rows)
    bad = sum(r["contaminated"] for r in rows)
    return {"n": n, "unit": "token" if encode is not None else "word", "items": len(rows),
            "checked": checked, "too_short": len(rows) - checked, "contaminated": bad,
            "rate": bad / checked if checked else 0.0, "min_fraction": min_fraction,
            "train_units": index.units_read, "rows": rows}


def shard_stream(shards, splits: Sequence[str] = ("train",), n: int = 13,
                 chunk: int = 1 << 24) -> Iterable[torch.Tensor]:
    """The token ids of ``shards`` (:class:`llmcore.data.shards.TokenShards`), split by
    split, in chunks of ``chunk`` tokens that overlap by ``n - 1`` so that no window is lost
    at a chunk edge. Documents inside a split are joined by the eos id, which evaluation
    n-grams never contain."""
    for split in splits:
        t = shards.tokens(split)
        for s in range(0, max(t.numel() - n + 1, 1), chunk):
            yield t[s:s + chunk + n - 1].to(torch.int64)


__all__ = ["NgramIndex", "check_contamination", "ngram_keys", "read_eval_items",
           "shard_stream", "words"]
