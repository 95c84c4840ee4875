"""Domains: documents grouped so that batches can be drawn by domain.

A run's domains (the ``domains`` config key) come from one of

* ``"stdlib"``: the standard-library corpus split by :func:`stdlib_domain`, a fixed rule
  on each file's relative path (first match wins):

  =============  ===========================================================  ========
  domain         files                                                        ~size
  =============  ===========================================================  ========
  ``tests``      under a ``test``/``tests``/``idle_test`` folder, or named      19 MB
                 ``test_*.py``
  ``modules``    single-file top-level modules (``os.py``, ``typing.py``)       4.7 MB
  ``encodings``  the ``encodings`` package: codec tables, mostly generated      1.4 MB
  ``apps``       applications and tools with their data: ``idlelib``,          3.0 MB
                 ``tkinter``, ``turtledemo``, ``lib2to3``, ``pydoc_data``,
                 ``distutils``, ``ensurepip``, ``venv``, ``curses``,
                 ``wsgiref``
  ``packages``   every other package (``asyncio``, ``email``, ``xml``, ...)     3.1 MB
  =============  ===========================================================  ========

  (sizes: CPython 3.11; tests are over half the corpus, which is what makes the
  natural mixture a poor default);
* ``"field:NAME"``: JSONL data whose rows carry the domain in field ``NAME``;
* a table ``{name = [paths...]}``: separate inputs, one domain each.

:func:`prepare_domain_shards` tokenises each domain into its own shard folder
(``OUT/<domain>/`` in the format of :mod:`llmcore.data.shards`; the train/val split per
document as for undivided data), so a sampler can draw windows from one domain and the
evaluation can report each domain's held-out bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from llmcore.data.corpus import SPLITS, Document, _expand, iter_documents, manifest, split_of
from llmcore.data.jsonl import iter_jsonl
from llmcore.data.shards import TokenShards, _write_tokens

STDLIB_DOMAINS = ("apps", "encodings", "modules", "packages", "tests")
_TEST_DIRS = {"test", "tests", "idle_test"}
_APPS = {"idlelib", "tkinter", "turtledemo", "lib2to3", "pydoc_data", "distutils",
         "ensurepip", "venv", "curses", "wsgiref"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RULE_VERSION = 1  # bump when stdlib_domain changes (cached shards are keyed by it)


def stdlib_domain(rel_path: str) -> str:
    """The domain of a standard-library file from its path relative to the stdlib root
    (see the module docstring for the rule)."""
    parts = PurePosixPath(rel_path).parts
    if any(p in _TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_"):
        return "tests"
    if len(parts) == 1:
        return "modules"
    if parts[0] == "encodings":
        return "encodings"
    if parts[0] in _APPS:
        return "apps"
    return "packages"


def check_domains_spec(domains, data) -> None:
    """Raise ValueError (naming the config key) unless ``domains`` is a valid spec."""
    if isinstance(domains, str):
        if domains == "stdlib":
            if data != "stdlib":
                raise ValueError("config key 'domains': 'stdlib' splits the stdlib corpus; "
                                 f"data is {data!r}")
            return
        if domains.startswith("field:") and domains[len("field:"):]:
            return
        raise ValueError("config key 'domains' must be 'stdlib', 'field:NAME' or a table "
                         f"{{name = [paths]}}, got {domains!r}")
    if not isinstance(domains, dict) or not domains:
        raise ValueError("config key 'domains' must be 'stdlib', 'field:NAME' or a non-empty "
                         f"table {{name = [paths]}}, got {domains!r}")
    for name, paths in domains.items():
        if not _NAME.match(name):
            raise ValueError(f"config key 'domains': domain name {name!r} must be 1-64 "
                             "letters, digits, '_', '.' or '-'")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str)
                                                                for p in paths):
            raise ValueError(f"config key 'domains': domain {name!r} needs a path or a "
                             f"non-empty list of paths, got {paths!r}")


def domain_data(domains, data):
    """The data a tokenizer for ``domains`` is trained on: ``data``, or for separate
    inputs the union of their paths."""
    if isinstance(domains, dict):
        return [p for v in domains.values() for p in ([v] if isinstance(v, str) else v)]
    return data


def iter_domain_documents(data, domains, split: str | None = None,
                          val_fraction: float = 0.05) -> Iterator[tuple[str, Document]]:
    """(domain, document) for every document of ``data`` under the spec ``domains``."""
    check_domains_spec(domains, data)
    if isinstance(domains, dict):
        for name, paths in domains.items():
            for doc in iter_documents([paths] if isinstance(paths, str) else paths, split,
                                      val_fraction):
                yield name, doc
    elif domains == "stdlib":
        for doc in iter_documents("stdlib", split, val_fraction):
            yield stdlib_domain(doc.source), doc
    else:
        field = domains[len("field:"):]
        if isinstance(data, str) and data == "stdlib":
            raise ValueError(f"config key 'domains': {domains!r} needs JSONL data, not stdlib")
        for key, path in _expand([data] if isinstance(data, (str, os.PathLike)) else data):
            if path.suffix != ".jsonl":
                raise ValueError(f"config key 'domains': {domains!r} reads JSONL rows; {path} "
                                 "is not a .jsonl file")
            for i, row in iter_jsonl(path):
                source = f"{key}:{i}"
                if split is not None and split_of(source, val_fraction) != split:
                    continue
                text, dom = row.get("text"), row.get(field)
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{i}: each JSONL line needs a string 'text' field")
                if not isinstance(dom, str) or not _NAME.match(dom):
                    raise ValueError(f"{path}:{i}: field {field!r} must name a domain (1-64 "
                                     f"letters, digits, '_', '.', '-'), got {dom!r}")
                yield dom, Document(source, text)


def prepare_domain_shards(data, domains, tokenizer_dir: str | os.PathLike,
                          out: str | os.PathLike, val_fraction: float = 0.05) -> dict:
    """Tokenise every domain of ``data`` into ``out/<domain>/`` (one shard folder each)
    and write ``out/domains.json`` ({"domains": names, "content_sha256": ...}) last; a
    folder that already holds the same content is kept. Returns that index."""
    from llmcore.tokenizer import load_tokenizer, tokenizer_hash

    check_domains_spec(domains, data)
    tok = load_tokenizer(tokenizer_dir)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no eos token")
    source = domain_data(domains, data)
    man = manifest(source, val_fraction)
    content = hashlib.sha256(json.dumps(
        {"data": man["sha256"], "domains": domains, "rule": RULE_VERSION,
         "tokenizer": tokenizer_hash(tokenizer_dir), "val_fraction": val_fraction},
        sort_keys=True).encode()).hexdigest()
    out = Path(out)
    index = out / "domains.json"
    if index.is_file():
        old = json.loads(index.read_text(encoding="utf-8"))
        if old.get("content_sha256") == content:
            return old
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    code = "H" if dtype == "uint16" else "I"
    counts: dict[str, dict[str, dict]] = {}
    files: dict[tuple[str, str], object] = {}
    pending: dict[tuple[str, str], list[str]] = {}
    try:
        for split in SPLITS:
            for dom, doc in iter_domain_documents(data, domains, split, val_fraction):
                key = (dom, split)
                if key not in files:
                    (out / dom).mkdir(exist_ok=True)
                    files[key] = open(out / dom / f"{split}.bin", "wb")
                    pending[key] = []
                c = counts.setdefault(dom, {s: {"tokens": 0, "documents": 0, "bytes": 0}
                                            for s in SPLITS})[split]
                c["documents"] += 1
                c["bytes"] += len(doc.text.encode("utf-8"))
                pending[key].append(doc.text)
                if len(pending[key]) >= 256:
                    c["tokens"] += _write_tokens(files[key], tok, pending[key], code)
                    pending[key] = []
            for (dom, s), texts in pending.items():
                if s == split and texts:
                    counts[dom][split]["tokens"] += _write_tokens(files[(dom, s)], tok, texts,
                                                                  code)
                    pending[(dom, s)] = []
    finally:
        for f in files.values():
            f.close()
    if isinstance(domains, dict):
        for name in domains:
            if name not in counts:
                raise ValueError(f"config key 'domains': domain {name!r} has no documents")
    names = sorted(counts)
    for dom in names:
        for split in SPLITS:
            (out / dom / f"{split}.bin").touch()
        header = {"format": "llmcore-tokens", "version": 1, "dtype": dtype,
                  "vocab_size": tok.vocab_size, "eos_id": tok.eos_token_id,
                  "tokenizer_sha256": tokenizer_hash(tokenizer_dir), "content_sha256": content,
                  "val_fraction": val_fraction, "data": man["data"], "domain": dom,
                  "splits": counts[dom]}
        (out / dom / "header.json").write_text(json.dumps(header, indent=2) + "\n",
                                               encoding="utf-8")
    result = {"domains": names, "content_sha256": content,
              "tokens": {d: counts[d]["train"]["tokens"] for d in names}}
    tmp = out / ".domains.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, index)
    return result


def ensure_domain_shards(data, domains, tokenizer_dir: str | os.PathLike,
                         val_fraction: float = 0.05) -> Path:
    """Per-domain shards of ``data`` (cached under ``$LLMCORE_CACHE/domains``)."""
    from llmcore.data.prepare import _key, cache_dir
    from llmcore.tokenizer import tokenizer_hash

    man = manifest(domain_data(domains, data), val_fraction)
    out = cache_dir() / "domains" / _key([man["sha256"], domains, RULE_VERSION,
                                          tokenizer_hash(tokenizer_dir), val_fraction])
    prepare_domain_shards(data, domains, tokenizer_dir, out, val_fraction)
    return out


class DomainShards:
    """The shard folders of a :func:`prepare_domain_shards` output: ``names`` (sorted),
    ``shards[name]`` a :class:`TokenShards`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "domains.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index} not found: not a domain shard folder")
        self.names: list[str] = list(json.loads(index.read_text(encoding="utf-8"))["domains"])
        self.shards = {n: TokenShards(self.path / n) for n in self.names}
        vocab = {s.vocab_size for s in self.shards.values()}
        if len(vocab) != 1:
            raise ValueError(f"{self.path}: the domains were tokenised with different "
                             f"vocabularies {sorted(vocab)}")

    @property
    def vocab_size(self) -> int:
        return next(iter(self.shards.values())).vocab_size

    def num_tokens(self, split: str) -> dict[str, int]:
        return {n: s.num_tokens(split) for n, s in self.shards.items()}

    def natural_weights(self) -> dict[str, float]:
        """Each domain's share of the train tokens (the mixture of undivided data)."""
        n = self.num_tokens("train")
        total = sum(n.values())
        return {k: v / total for k, v in n.items()}


__all__ = ["STDLIB_DOMAINS", "DomainShards", "check_domains_spec", "domain_data",
           "ensure_domain_shards", "iter_domain_documents", "prepare_domain_shards",
           "stdlib_domain"]
