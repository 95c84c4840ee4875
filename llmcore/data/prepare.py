"""Tokenizers and shards made on demand and cached by content.

A run that names no tokenizer or shard directory gets them from the cache
(``$LLMCORE_CACHE``, default ``~/.cache/llmcore``): a byte-level BPE trained on the
train split of its data, and the shards of that data. Both are keyed by a hash of what
they are made from (the data files' contents, the vocabulary size, the tokenizer), so a
second run reuses them and a changed corpus makes new ones. Nothing is written next to
the code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from llmcore.data.corpus import iter_documents, manifest
from llmcore.data.shards import prepare_shards
from llmcore.tokenizer import tokenizer_hash, train_tokenizer

TOKENIZER_RECIPE = "bytelevel-bpe-v1"


def cache_dir() -> Path:
    """``$LLMCORE_CACHE`` or ``~/.cache/llmcore`` (created)."""
    root = Path(os.environ.get("LLMCORE_CACHE") or Path.home() / ".cache" / "llmcore")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def ensure_tokenizer(data: str | Sequence[str], vocab_size: int, val_fraction: float = 0.05,
                     progress: bool = True) -> Path:
    """A tokenizer trained on the train split of ``data`` (cached)."""
    man = manifest(data, val_fraction)
    out = cache_dir() / "tokenizers" / _key([TOKENIZER_RECIPE, man["sha256"], vocab_size,
                                             val_fraction])
    if (out / "tokenizer_config.json").is_file():
        return out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    n = sum(1 for r in man["files"] if r["split"] == "train")
    train_tokenizer((d.text for d in iter_documents(data, "train", val_fraction)), vocab_size,
                    tmp, length=n, show_progress=progress)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def ensure_shards(data: str | Sequence[str], tokenizer_dir: str | os.PathLike,
                  val_fraction: float = 0.05, progress: bool = True) -> Path:
    """Shards of ``data`` tokenised with ``tokenizer_dir`` (cached)."""
    man = manifest(data, val_fraction)
    out = cache_dir() / "shards" / _key([man["sha256"], tokenizer_hash(tokenizer_dir),
                                         val_fraction])
    prepare_shards(data, tokenizer_dir, out, val_fraction, progress=progress)
    return out


STDLIB_TASKS = {"sft": "write_sft_stdlib", "preference": "write_preferences_stdlib"}


def ensure_stdlib_task(kind: str, val_fraction: float = 0.05, progress: bool = True) -> Path:
    """The stdlib instruction (``"sft"``) or preference set, built into the cache once
    (a folder with train.jsonl, val.jsonl and stats.json)."""
    from llmcore.data import stdlib_tasks

    if kind not in STDLIB_TASKS:
        raise ValueError(f"kind must be one of {tuple(STDLIB_TASKS)}, got {kind!r}")
    man = manifest("stdlib", val_fraction)
    out = cache_dir() / "tasks" / _key([kind, "stdlib-tasks-v2", man["sha256"], val_fraction])
    if (out / "stats.json").is_file():
        return out
    if progress:
        print(f"building the stdlib {kind} set (about a minute, once; cached in {out})",
              flush=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    getattr(stdlib_tasks, STDLIB_TASKS[kind])(tmp, val_fraction=val_fraction)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
