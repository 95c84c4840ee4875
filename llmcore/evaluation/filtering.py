"""AlpaGasus-style data filtering: score every row of an instruction set with a judge and
keep those at or above a threshold.

:func:`filter_rows` scores prompt/response rows (a chat row is judged on its last user
message and the assistant answer after it) and returns the kept rows with the scores, a
histogram and the counts; ``llmcore data filter`` writes the kept rows as JSONL next to a
``filter.json`` report. Held-out rows (a folder's ``val.jsonl``) are copied unfiltered, so
a model trained on the filtered set is evaluated on the same rows as one trained on all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path


def _pair(row: dict) -> tuple[str, str]:
    if "messages" in row:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        user = next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), "")
        return user, msgs[last]["content"]
    return row["prompt"], row["response"]


def histogram(scores: Sequence[float], bins: int = 10) -> dict:
    """Equal-width bins over [min, max] of the scores: {"edges": [...], "counts": [...]}."""
    if not scores:
        return {"edges": [], "counts": []}
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return {"edges": [lo, hi], "counts": [len(scores)]}
    width = (hi - lo) / bins
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / width), bins - 1)] += 1
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts}


def filter_rows(rows: list, judge, threshold: float, batch_size: int = 64,
                progress: bool = False) -> dict:
    """Score ``rows`` (:class:`llmcore.data.examples.Row`, SFT kind) with ``judge`` and
    keep those scoring >= ``threshold``. Returns {"kept": rows, "scores": [...],
    "counts": {"rows", "kept", "removed"}, "histogram": ...}."""
    from tqdm.auto import tqdm

    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    scores: list[float] = []
    for i in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="judging",
                  unit="batch"):
        part = [_pair(r.data) for r in rows[i:i + batch_size]]
        scores += [float(x) for x in judge.score_many([p for p, _ in part],
                                                      [a for _, a in part])]
    kept = [r for r, s in zip(rows, scores, strict=True) if s >= threshold]
    return {"kept": kept, "scores": scores, "histogram": histogram(scores),
            "counts": {"rows": len(rows), "kept": len(kept), "removed": len(rows) - len(kept)}}


def write_filtered(data: str | os.PathLike, out: str | os.PathLike, judge, threshold: float,
                   skip_bad_rows: bool = False, progress: bool = True) -> dict:
    """Filter the SFT rows of ``data`` (a JSONL file, or a folder with train.jsonl and
    optionally val.jsonl) into folder ``out``: train.jsonl (kept rows), val.jsonl (copied
    unfiltered) and filter.json (counts, histogram, threshold, judge)."""
    from llmcore.data.examples import read_rows

    data, out = Path(data), Path(out)
    train = data / "train.jsonl" if data.is_dir() else data
    rows = read_rows(train, "sft", skip_bad_rows)
    res = filter_rows(rows, judge, threshold, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".train.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in res["kept"]:
            f.write(json.dumps(r.data, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "train.jsonl")
    if data.is_dir() and (data / "val.jsonl").is_file():
        shutil.copyfile(data / "val.jsonl", out / "val.jsonl")
    report = {"data": str(data), "threshold": threshold,
              "judge": getattr(judge, "name", type(judge).__name__), **res["counts"],
              "histogram": res["histogram"],
              "mean_score": sum(res["scores"]) / max(len(res["scores"]), 1)}
    (out / "filter.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


__all__ = ["filter_rows", "histogram", "write_filtered"]
