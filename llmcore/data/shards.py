"""Token shards: a corpus tokenised once into flat memory-mapped files.

A shard directory holds ``train.bin`` and ``val.bin`` (the token ids of every document
of that split, each document followed by the EOS id, little-endian uint16 when the
vocabulary fits, else uint32) and ``header.json``::

    {"format": "llmcore-tokens", "version": 1, "dtype": "uint16", "vocab_size": 8192,
     "eos_id": 1, "tokenizer_sha256": "...", "content_sha256": "...",
     "splits": {"train": {"tokens": N, "documents": D, "bytes": B}, "val": {...}}}

``bytes`` is the UTF-8 size of the split's text, which turns a summed token NLL into bits
per byte. :func:`prepare_shards` streams documents (memory stays bounded, whatever the
corpus size) and skips the work when the directory already holds the same content (the
hash of the data files, the tokenizer and the split). Files are written under temporary
names and renamed, the header last, so an interrupted run leaves no valid-looking shard.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from llmcore.data.corpus import SPLITS, iter_documents, manifest

FORMAT, VERSION = "llmcore-tokens", 1
_DTYPES = {"uint16": (torch.uint16, 2), "uint32": (torch.uint32, 4)}


def _content_hash(man: dict, tok_sha: str) -> str:
    key = json.dumps({"data": man["sha256"], "val_fraction": man["val_fraction"],
                      "tokenizer": tok_sha, "version": VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def current_header(path: str | os.PathLike, content: str) -> dict | None:
    """The header of the shard directory ``path`` when it holds exactly ``content``
    (its ``content_sha256``), else None (missing, unreadable or other content)."""
    try:
        header = read_header(path)
    except (FileNotFoundError, ValueError):
        return None
    return header if header.get("content_sha256") == content else None


def read_header(path: str | os.PathLike) -> dict:
    """The header of shard directory ``path``, checked."""
    f = Path(path) / "header.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: not a token shard directory (make one with "
                                "`llmcore data prepare`)")
    try:
        h = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT or h.get("version") != VERSION:
        raise ValueError(f"{f}: not an {FORMAT} v{VERSION} header")
    if h.get("dtype") not in _DTYPES:
        raise ValueError(f"{f}: dtype must be one of {list(_DTYPES)}, got {h.get('dtype')!r}")
    for split in SPLITS:
        info = h.get("splits", {}).get(split)
        if not isinstance(info, dict) or not all(
                isinstance(info.get(k), int) and info[k] >= 0
                for k in ("tokens", "documents", "bytes")):
            raise ValueError(f"{f}: split {split!r} needs non-negative int tokens, documents "
                             "and bytes")
        size = (Path(path) / f"{split}.bin").stat().st_size
        if size != info["tokens"] * _DTYPES[h["dtype"]][1]:
            raise ValueError(f"{Path(path) / f'{split}.bin'} holds {size} bytes; the header "
                             f"says {info['tokens']} {h['dtype']} tokens")
    return h


def prepare_shards(data: str | Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike,
                   out: str | os.PathLike, val_fraction: float = 0.05, batch_docs: int = 256,
                   progress: bool = True) -> dict:
    """Tokenise ``data`` (``"stdlib"`` or files) with the tokenizer in ``tokenizer_dir``
    into shard directory ``out``; returns the header. Skipped (the existing header is
    returned) when ``out`` already holds the same content."""
    from tqdm.auto import tqdm

    from llmcore.tokenizer import load_tokenizer, tokenizer_hash

    if not isinstance(batch_docs, int) or batch_docs < 1:
        raise ValueError(f"batch_docs must be a positive int, got {batch_docs!r}")
    tok = load_tokenizer(tokenizer_dir)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no eos token (documents are separated "
                         "by it)")
    man = manifest(data, val_fraction)
    content = _content_hash(man, tokenizer_hash(tokenizer_dir))
    out = Path(out)
    old = current_header(out, content)
    if old is not None:
        return old
    out.mkdir(parents=True, exist_ok=True)
    (out / "header.json").unlink(missing_ok=True)  # invalid until the new one is written
    vocab = tok.vocab_size
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    code = "H" if dtype == "uint16" else "I"  # array typecodes of 2 and 4 bytes
    splits = {}
    total = sum(r["size"] for r in man["files"])
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising",
               disable=not progress)
    for split in SPLITS:
        tmp = out / f".{split}.bin.tmp"
        n_tok = n_doc = n_bytes = 0
        with open(tmp, "wb") as f:
            batch: list[str] = []
            for doc in iter_documents(data, split, val_fraction):
                b = len(doc.text.encode("utf-8"))
                n_doc, n_bytes = n_doc + 1, n_bytes + b
                bar.update(b)
                batch.append(doc.text)
                if len(batch) >= batch_docs:
                    n_tok += _write_tokens(f, tok, batch, code)
                    batch = []
            n_tok += _write_tokens(f, tok, batch, code)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / f"{split}.bin")
        splits[split] = {"tokens": n_tok, "documents": n_doc, "bytes": n_bytes}
    bar.close()
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": vocab,
              "eos_id": tok.eos_token_id, "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
              "content_sha256": content, "val_fraction": val_fraction,
              "data": man["data"], "splits": splits}
    (out / "manifest.json").write_text(json.dumps(man, indent=1) + "\n", encoding="utf-8")
    tmp = out / ".header.json.tmp"
    tmp.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "header.json")
    return header


def _write_tokens(f, tok, texts: list[str], code: str) -> int:
    """Append the ids of ``texts``, each followed by EOS, to ``f``; returns the count."""
    n = 0
    for enc in tok.tokenizer.encode_batch(texts, add_special_tokens=False):
        arr = array.array(code, enc.ids)
        arr.append(tok.eos_token_id)
        if sys.byteorder == "big":
            arr.byteswap()
        f.write(arr.tobytes())
        n += len(arr)
    return n


class TokenShards:
    """Read access to a shard directory: ``shards.tokens(split)`` is a memory-mapped 1-D
    tensor of the split's ids (uint16/uint32; slice, then ``.long()``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._tokens: dict[str, torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.header["eos_id"]

    def num_tokens(self, split: str) -> int:
        return self.header["splits"][split]["tokens"]

    def bytes_per_token(self, split: str) -> float:
        s = self.header["splits"][split]
        return s["bytes"] / max(s["tokens"], 1)

    def tokens(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._tokens:
            n = self.num_tokens(split)
            dtype = _DTYPES[self.header["dtype"]][0]
            self._tokens[split] = (torch.from_file(str(self.path / f"{split}.bin"), shared=False,
                                                   size=n, dtype=dtype) if n else
                                   torch.empty(0, dtype=dtype))
        return self._tokens[split]
