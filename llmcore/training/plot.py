"""``llmcore plot RUN_DIR``: the curves of a run's ``metrics.jsonl`` as PNG files.

Writes ``plots/loss.png`` (train loss and, where logged, validation loss against step,
with validation bits per byte on a second panel — periodic evaluations on a sample of the
split and the final one on the whole split drawn apart, and the run's ``xz -9e`` baseline
from ``summary.json`` when present) and ``plots/lr.png`` (learning rate,
gradient norm and tokens/s). Needs matplotlib (``pip install llmcore[plot]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of ``RUN_DIR/metrics.jsonl``."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: not a run directory")
    train, val = [], []
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{f}:{i}: not valid JSON") from None
        (val if row.get("split") == "val" else train).append(row)
    return train, val


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write the PNG curves of ``run_dir`` into ``out`` (default ``RUN_DIR/plots``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    train, val = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training rows yet")
    out = Path(out) if out is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    steps = [r["step"] for r in train]

    has_bpb = any("val_bpb" in r for r in val)
    fig, axes = plt.subplots(1, 2 if has_bpb else 1, figsize=(11 if has_bpb else 6, 4),
                             squeeze=False)
    full_n = max((r.get("val_tokens", 0) for r in val), default=0)
    full = [r for r in val if r.get("val_tokens", 0) == full_n]
    part = [r for r in val if r.get("val_tokens", 0) != full_n]
    series = [(part, "o-", f"val (sample of {part[0].get('val_tokens', 0):,} tokens)"
               if part else ""), (full, "*", "val (whole split)" if part else "val")]
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train")
    for rows, style, label in series:
        if rows and "val_loss" in rows[0]:
            ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], style, ms=8,
                    label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_bpb:
        ax = axes[0][1]
        for (rows, style, label), color in zip(series, ("C1", "C3"), strict=True):
            rows = [r for r in rows if "val_bpb" in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r["val_bpb"] for r in rows], style,
                        color=color, ms=10, label=label)
        summary = Path(run_dir) / "summary.json"
        xz = json.loads(summary.read_text()).get("xz_9e") if summary.is_file() else None
        if xz:
            ax.axhline(xz["bpb"], color="k", ls="--", lw=1,
                       label=f"xz -9e, same documents ({xz['bpb']:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.set_title("held-out bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, label in zip(axes, ("lr", "grad_norm", "tokens_per_s"),
                              ("learning rate", "grad norm (before clipping)", "tokens/s"),
                              strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in train], lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    lr_png = out / "lr.png"
    fig.savefig(lr_png, dpi=120)
    plt.close(fig)
    return [loss_png, lr_png]
