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


def _check_cut(threshold: float | None, keep_fraction: float | None) -> None:
    if (threshold is None) == (keep_fraction is None):
        raise ValueError("give exactly one of threshold and keep_fraction")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")


def fraction_threshold(scores: Sequence[float], keep_fraction: float) -> float:
    """The score of the ``ceil(keep_fraction * n)``-th best row: keeping rows >= it keeps
    at least that share (more when scores tie at the cut)."""
    if not scores:
        raise ValueError("no scores to take a fraction of")
    k = max(1, math.ceil(keep_fraction * len(scores) - 1e-9))
    return sorted(scores, reverse=True)[k - 1]


def filter_rows(rows: list, judge, threshold: float | None = None, batch_size: int = 64,
                progress: bool = False, keep_fraction: float | None = None) -> dict:
    """Score ``rows`` (:class:`llmcore.data.examples.Row`, SFT kind) with ``judge`` and
    keep those scoring >= ``threshold`` — or, with ``keep_fraction`` instead, the best
    that share of them (the threshold is then the score at that rank). Returns
    {"kept": rows, "scores": [...], "threshold": float, "counts": {"rows", "kept",
    "removed"}, "histogram": ...}."""
    from tqdm.auto import tqdm

    _check_cut(threshold, keep_fraction)
    scores: list[float] = []
    for i in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="judging",
                  unit="batch"):
        part = [_pair(r.data) for r in rows[i:i + batch_size]]
        scores += [float(x) for x in judge.score_many([p for p, _ in part],
                                                      [a for _, a in part])]
    bad = [i for i, x in enumerate(scores) if not math.isfinite(x)]
    if bad:
        raise ValueError(f"the judge gave a non-finite score to {len(bad)} rows "
                         f"(first: row {bad[0]})")
    if keep_fraction is not None:
        threshold = fraction_threshold(scores, keep_fraction) if scores else 0.0
    kept = [r for r, s in zip(rows, scores, strict=True) if s >= threshold]
    return {"kept": kept, "scores": scores, "threshold": threshold,
            "histogram": histogram(scores),
            "counts": {"rows": len(rows), "kept": len(kept), "removed": len(rows) - len(kept)}}


def write_filtered(data: str | os.PathLike, out: str | os.PathLike, judge,
                   threshold: float | None = None, skip_bad_rows: bool = False,
                   progress: bool = True, keep_fraction: float | None = None) -> dict:
    """Filter the SFT rows of ``data`` (a JSONL file, or a folder with train.jsonl and
    optionally val.jsonl) into folder ``out``: train.jsonl (kept rows), val.jsonl (copied
    unfiltered), scores.jsonl (every row's score, in input order) and filter.json (counts,
    histogram, threshold, judge). Give ``threshold`` or ``keep_fraction``."""
    from llmcore.data.examples import read_rows

    _check_cut(threshold, keep_fraction)
    data, out = Path(data), Path(out)
    train = data / "train.jsonl" if data.is_dir() else data
    rows = read_rows(train, "sft", skip_bad_rows)
    res = filter_rows(rows, judge, threshold, progress=progress, keep_fraction=keep_fraction)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".train.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in res["kept"]:
            f.write(json.dumps(r.data, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "train.jsonl")
    if data.is_dir() and (data / "val.jsonl").is_file():
        shutil.copyfile(data / "val.jsonl", out / "val.jsonl")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for r, x in zip(rows, res["scores"], strict=True):
            f.write(json.dumps({"row": r.where, "score": x}) + "\n")
    report = {"data": str(data), "threshold": res["threshold"], "keep_fraction": keep_fraction,
              "judge": getattr(judge, "name", type(judge).__name__), **res["counts"],
              "histogram": res["histogram"],
              "mean_score": sum(res["scores"]) / max(len(res["scores"]), 1)}
    (out / "filter.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


__all__ = ["filter_rows", "fraction_threshold", "histogram", "write_filtered"]
