"""Our own scaling sweep: a grid of model sizes x compute budgets, each run trained with
the pretraining recipe on the one loop, then the Chinchilla law fitted to the final
validation losses and the isoFLOP curves plotted.

A budget C (FLOPs) gives every size N its token count D = C / (6 N), rounded to whole
steps of ``batch_size * seq_len`` tokens, so the runs of one budget lie on an isoFLOP
curve (Chinchilla Approach 2) and all runs together feed the Approach 3 fit. N counts
the parameters that cost 6 FLOPs per token: every matrix but the input embedding (the
output head included), as in the FLOP estimate of the training loop minus its attention
term. Each run has its own cosine schedule ending at its own token count.

Layout of ``out``: ``runs/<size>_C<budget>/`` (a normal run directory; a run with a
``summary.json`` is finished and skipped, one with a checkpoint is resumed), ``runs.csv``
(N, D, C, loss per run), ``sweep.json`` (the grid, the runs and the fit) and
``isoflops.png``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# Model shapes of the sweeps (TransformerConfig overrides on the "tiny" preset).
QUICK_SIZES = {
    "d32": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 88},
    "d48": {"dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
    "d64": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 176},
    "d96": {"dim": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "ffn_dim": 256},
}
FULL_SIZES = {
    **QUICK_SIZES,
    "d128": {"dim": 128, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "ffn_dim": 352},
    "d192": {"dim": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "ffn_dim": 512},
    "d256": {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 688},
}
# --quick: 4 sizes x 3 budgets, 1.7e13 FLOPs of 6ND in all: sized for ~20 minutes on a
# 2-core CPU at the ~1.5e10 FLOP/s these small models reach (an estimate, not a promise).
QUICK_BUDGETS = (3e11, 1e12, 3e12)
FULL_BUDGETS = (1e12, 3e12, 1e13, 3e13, 1e14)
BASE = {"data": "stdlib", "vocab_size": 1024, "batch_size": 16, "seq_len": 128,
        "lr": 3e-3, "min_lr": 3e-4, "warmup": 20, "schedule": "cosine", "eval_every": 0,
        "sample_tokens": 0, "save_every": 500, "keep_last": 1, "tensorboard": False,
        "progress": False, "seed": 1234}


@dataclass
class SweepSpec:
    """The grid: named model shapes, compute budgets (FLOPs) and the base training
    config values (TrainConfig keys) every run shares."""

    sizes: dict = field(default_factory=lambda: dict(QUICK_SIZES))
    budgets: tuple = QUICK_BUDGETS
    base: dict = field(default_factory=lambda: dict(BASE))

    @classmethod
    def quick(cls, **base) -> SweepSpec:
        return cls(dict(QUICK_SIZES), QUICK_BUDGETS, {**BASE, **base})

    @classmethod
    def full(cls, **base) -> SweepSpec:
        return cls(dict(FULL_SIZES), FULL_BUDGETS, {**BASE, **base})


def params_6nd(model: dict, preset: str, vocab_size: int) -> int:
    """N of C = 6 N D: the non-embedding parameters plus the output head."""
    from llmcore.models import TransformerConfig

    mcfg = TransformerConfig.from_name(preset, **{**model, "vocab_size": vocab_size})
    return mcfg.num_params(embeddings=False) + vocab_size * mcfg.dim


def plan_runs(spec: SweepSpec) -> list[dict]:
    """One entry per (size, budget): name, model overrides, N, steps, D, C (6 N D)."""
    if not spec.sizes or not spec.budgets:
        raise ValueError("a sweep needs at least one size and one budget")
    for c in spec.budgets:
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"budgets must be positive FLOP counts, got {c!r}")
    base = spec.base
    per_step = base["batch_size"] * base["seq_len"] * base.get("grad_accum", 1)
    runs = []
    for budget in sorted(spec.budgets):
        for name, model in spec.sizes.items():
            n = params_6nd({**base.get("model", {}), **model}, base.get("preset", "tiny"),
                           base["vocab_size"])
            steps = max(1, round(budget / (6 * n * per_step)))
            d = steps * per_step
            runs.append({"name": f"{name}_C{budget:.0e}".replace("+", ""), "size": name,
                         "model": model, "budget": budget, "N": n, "steps": steps, "D": d,
                         "C": 6.0 * n * d})
    return runs


def _config(spec: SweepSpec, run: dict):
    from llmcore.training.config import TrainConfig, apply

    values = {**spec.base, "model": {**spec.base.get("model", {}), **run["model"]},
              "steps": run["steps"]}
    values["warmup"] = min(values.get("warmup", 10), max(0, run["steps"] // 10))
    values["save_every"] = min(values.get("save_every", 0) or run["steps"], run["steps"])
    return apply(TrainConfig(), values, where="sweep").validate()


def run_sweep(spec: SweepSpec, out, log=print, fit_grid: dict | None = None) -> dict:
    """Train every run of ``spec`` not yet finished under ``out``, then fit and plot.
    Returns the content of ``sweep.json``."""
    from llmcore.training import checkpoint as ckpt
    from llmcore.training.recipes import pretrain

    out = Path(out)
    runs = plan_runs(spec)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs):
        run_dir = out / "runs" / run["name"]
        summary_file = run_dir / "summary.json"
        cfg = _config(spec, run)
        if summary_file.is_file():
            log(f"[{i + 1}/{len(runs)}] {run['name']}: finished, skipped")
        else:
            resume = bool(ckpt.list_checkpoints(run_dir))
            log(f"[{i + 1}/{len(runs)}] {run['name']}: N={run['N']:,} D={run['D']:,} "
                f"({run['steps']} steps){' resumed' if resume else ''}")
            pretrain.run(cfg, run_dir, resume=resume)
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        run["loss"] = summary["val"]["val_loss"]
        run["bpb"] = summary["val"]["val_bpb"]
        run["train_time_s"] = summary.get("train_time_s")
    with (out / "runs.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "N", "D", "C", "loss"])
        for r in runs:
            w.writerow([r["name"], r["N"], r["D"], r["C"], r["loss"]])
    result = {"sizes": spec.sizes, "budgets": list(spec.budgets), "base": spec.base,
              "runs": runs, "fit": None}
    if len(runs) >= 5 and len({r["N"] for r in runs}) >= 2 and len({r["D"] for r in runs}) >= 2:
        from llmcore.scaling.chinchilla import fit_chinchilla

        fit = fit_chinchilla([r["N"] for r in runs], [r["D"] for r in runs],
                             [r["loss"] for r in runs], grid=fit_grid)
        result["fit"] = fit.to_dict()
        result["frontier"] = [dict(zip(("C", "N_opt", "D_opt"), (c, *fit.compute_optimal(c)), strict=True))
                              for c in sorted(spec.budgets)]
    else:
        log("fit skipped: it needs at least 5 runs over 2 sizes and 2 token counts")
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    png = plot_isoflops(result, out / "isoflops.png")
    result["plot"] = str(png) if png else None
    return result


def plot_isoflops(result: dict, path) -> Path | None:
    """Loss against N per budget (the isoFLOP curves), the fitted law's curves dashed and
    its compute-optimal N marked. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from llmcore.scaling.chinchilla import ChinchillaFit

    fit = ChinchillaFit(**result["fit"]) if result.get("fit") else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("viridis")
    budgets = sorted(result["budgets"])
    for k, budget in enumerate(budgets):
        col = colors(k / max(1, len(budgets) - 1))
        rs = sorted((r for r in result["runs"] if r["budget"] == budget), key=lambda r: r["N"])
        ax.plot([r["N"] for r in rs], [r["loss"] for r in rs], "o-", color=col,
                label=f"C = {budget:.0e}")
        if fit is not None:
            lo, hi = rs[0]["N"] / 2, rs[-1]["N"] * 2
            ns = [lo * (hi / lo) ** (i / 63) for i in range(64)]
            ax.plot(ns, [fit.predict(n, budget / (6 * n)) for n in ns], "--", color=col,
                    alpha=0.7)
            n_opt, d_opt = fit.compute_optimal(budget)
            ax.plot([n_opt], [fit.predict(n_opt, d_opt)], "*", color=col, markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (non-embedding + head)")
    ax.set_ylabel("validation loss (nats/token)")
    title = "isoFLOP curves"
    if fit is not None:
        title += (f"; fit E={fit.E:.2f} A={fit.A:.3g} B={fit.B:.3g} "
                  f"α={fit.alpha:.2f} β={fit.beta:.2f} (★ compute-optimal)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
