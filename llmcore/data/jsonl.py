"""Reading JSONL: one JSON value per line, blank lines skipped, errors naming file:line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | os.PathLike, objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of ``path``. A line that is not JSON
    raises ValueError ``"PATH:LINE: not valid JSON (...)"``; with ``objects`` (the default)
    so does a value that is not a JSON object."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if objects and not isinstance(value, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            yield i, value


__all__ = ["iter_jsonl"]
