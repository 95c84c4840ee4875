"""Documents to train on: the embedded standard-library corpus and user files.

``--data stdlib`` is the running interpreter's own standard library: every ``.py`` file
under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages`` (installed
packages, often larger than the stdlib itself), ``__pycache__``, the generated
``_sysconfigdata_*.py`` and ``config-3.*`` build folders. Files are read as bytes and
decoded as UTF-8 with replacement (a few test files are deliberately not valid UTF-8).
The order is the sorted relative path, and the train/validation split is decided per
whole file by a hash of its relative path, so it is the same on every machine that has
the same file, whatever else the distribution ships. :func:`write_manifest` records
(path, size, sha256) of what was used, since distributions ship different stdlibs.

Other sources: ``.txt``/``.py``/any text file (one document per file), ``.jsonl`` (one
document per line, the ``text`` field) and ``.parquet`` (the ``text`` column; needs
pyarrow). A directory is walked for those suffixes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmcore.data.jsonl import iter_jsonl

SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".c", ".h", ".json")


@dataclass(frozen=True)
class Document:
    """One document: its source (a path, or path:line for JSONL) and its text."""

    source: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _skip_stdlib(rel: Path) -> bool:
    parts = rel.parts
    return (any(p in ("site-packages", "dist-packages", "__pycache__") or
                p.startswith("config-3") for p in parts[:-1])
            or parts[-1].startswith("_sysconfigdata_"))


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``.py`` files, as paths relative to ``root``, sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} not found")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not _skip_stdlib(rel_dir / d / "x"))
        out += [rel_dir / f for f in filenames
                if f.endswith(".py") and not _skip_stdlib(rel_dir / f)]
    return sorted(out, key=lambda p: p.as_posix())


def split_of(rel_path: str, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of paths, decided by a hash of the path alone."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2.0**64 < val_fraction else "train"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def stdlib_documents(split: str | None = None, val_fraction: float = 0.05,
                     root: str | os.PathLike | None = None) -> Iterator[Document]:
    """The stdlib corpus (optionally one split) as documents, in a fixed order."""
    _check_split(split)
    _check_fraction(val_fraction)
    root = Path(root) if root is not None else stdlib_root()
    for rel in stdlib_files(root):
        key = rel.as_posix()
        if split is not None and split_of(key, val_fraction) != split:
            continue
        yield Document(key, (root / rel).read_bytes().decode("utf-8", errors="replace"))


def _expand(paths: Sequence[str | os.PathLike],
            suffixes: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(key, path) of every data file: the key is the path relative to the directory given
    (or the file's name), so splits do not depend on where the data lives. ``suffixes``:
    more file types to take from folders."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [(f.relative_to(p).as_posix(), f) for f in sorted(p.rglob("*"))
                      if f.is_file() and
                      f.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet", *suffixes)]
        elif p.is_file():
            files.append((p.name, p))
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    if not files:
        raise ValueError(f"no data files found in {[str(p) for p in paths]}")
    return files


def _file_documents(key: str, path: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        for i, row in iter_jsonl(path, objects=False):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{i}: each JSONL line needs a string 'text' field")
            yield Document(f"{key}:{i}", row["text"])
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is not None:
                    yield Document(f"{key}:{row}", text)
    else:
        yield Document(key, path.read_bytes().decode("utf-8", errors="replace"))


def iter_documents(data: str | Sequence[str | os.PathLike], split: str | None = None,
                   val_fraction: float = 0.05,
                   suffixes: Sequence[str] = ()) -> Iterator[Document]:
    """Documents of ``data``: ``"stdlib"`` or a list of files/directories.

    With ``split``, user files are split like the stdlib: by a hash of each document's
    source (its path relative to the directory given, or the file name; ``:row`` added
    for JSONL/Parquet rows), so the split is the same wherever the data lives.
    ``suffixes`` adds file types to take from folders (the cleaning pipeline adds
    ``.html``).
    """
    _check_split(split)
    _check_fraction(val_fraction)
    if isinstance(data, str) and data == "stdlib":
        yield from stdlib_documents(split, val_fraction)
        return
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    for key, path in _expand(data, suffixes):
        for doc in _file_documents(key, path):
            if split is None or split_of(doc.source, val_fraction) == split:
                yield doc


def data_files(data: str | Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name, path) of every file ``data`` reads (for manifests and content hashes)."""
    if isinstance(data, str) and data == "stdlib":
        root = stdlib_root()
        return [(rel.as_posix(), root / rel) for rel in stdlib_files(root)]
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    return _expand(data)


def manifest(data: str | Sequence[str | os.PathLike], val_fraction: float = 0.05) -> dict:
    """{"files": [{path, size, sha256, split}], "sha256": hash of the whole list}."""
    rows = []
    for name, path in data_files(data):
        blob = path.read_bytes()
        rows.append({"path": name, "size": len(blob),
                     "sha256": hashlib.sha256(blob).hexdigest(),
                     "split": split_of(name, val_fraction)})
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return {"data": data if isinstance(data, str) else [str(d) for d in data],
            "val_fraction": val_fraction, "files": rows, "sha256": digest}


def write_manifest(man: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(man, indent=1) + "\n", encoding="utf-8")
