"""Atomic file-system writes shared by every layer (checkpoints, model directories).

:func:`atomic_directory` builds a directory in a hidden temporary sibling, fsyncs every
file and renames it into place: a failure (an exception, a crash) at any moment leaves the
previous directory whole, never a mix of old and new files.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directory itself."""
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no data copied: the old directory's files stay as they are
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def atomic_directory(final: str | os.PathLike, keep_existing: bool = False,
                     exclude: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` in one rename.

    ``keep_existing``: the temporary directory starts with ``final``'s current contents
    (hard links where possible), less the top-level names in ``exclude``, so files the
    caller does not write (a tokenizer beside the weights) survive the replacement."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    skip = set(exclude)
    try:
        if keep_existing and final.is_dir():
            shutil.copytree(final, tmp, symlinks=True, copy_function=_link_or_copy,
                            ignore=lambda d, names: [n for n in names
                                                     if Path(d) == final and n in skip])
        else:
            tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a regular file (or a link to one); FileNotFoundError when
    it does not exist, ValueError when it is a directory, a named pipe, a device or a
    socket (opening a pipe would block forever)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    if stat.S_ISREG(st.st_mode):
        return path
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
            "a named pipe" if stat.S_ISFIFO(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or special file")
    raise ValueError(f"{what} {path} is {kind}, not a regular file")
