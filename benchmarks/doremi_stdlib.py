"""DoReMi on the standard-library corpus: a model trained on the baseline (natural) domain
mixture against one trained on the DoReMi mixture, same model, same token budget.

    python benchmarks/doremi_stdlib.py                 # ~15 min on 2 CPU cores
    python benchmarks/doremi_stdlib.py --quick         # ~2 min smoke run (tiny models)

Runs (resumable: a finished stage is skipped) ``llmcore train doremi`` (reference on the
natural mixture, proxy with Group DRO, the averaged weights), then ``pretrain`` on the
DoReMi weights with the reference's config. The reference *is* the baseline model: same
config, same steps, the natural mixture. Writes ``OUT/doremi_stdlib.json`` (the weights,
every domain's held-out bits per byte for both models, the worst domain and the mean,
the whole split) and ``OUT/doremi_stdlib.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llmcore.training.config import TrainConfig, load_config
from llmcore.training.recipes import doremi, pretrain


def _figures(summary: dict) -> dict:
    val = summary["val"]
    return {"domains": {k: v["val_bpb"] for k, v in summary["domains"].items()},
            "xz_9e": {k: v.get("xz_9e_bpb") for k, v in summary["domains"].items()},
            "worst_bpb": val["val_bpb_worst"], "mean_bpb": val["val_bpb_mean"],
            "whole_val_bpb": val["val_bpb"], "tokens": summary["tokens"],
            "train_time_s": summary["train_time_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a couple of minutes")
    ap.add_argument("--runs", help="folder for the run directories (default: "
                    "~/llmcore-runs/doremi_stdlib[_quick])")
    ap.add_argument("--out", help="folder for the JSON and the plot (default: the runs folder)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key of every run (e.g. steps=300)")
    args = ap.parse_args()
    name = "tiny" if args.quick else "stdlib"
    runs = Path(args.runs or Path.home() / "llmcore-runs" /
                ("doremi_stdlib_quick" if args.quick else "doremi_stdlib"))
    out = Path(args.out) if args.out else runs
    out.mkdir(parents=True, exist_ok=True)
    sets = ["tensorboard=false", *args.sets]
    t0 = time.perf_counter()

    dr_dir = runs / "doremi"
    cfg = load_config(TrainConfig(recipe="doremi"), name, doremi.NAMED_CONFIGS, sets)
    if not (dr_dir / "domain_weights.json").is_file():
        doremi.run(cfg, dr_dir, resume=dr_dir.exists())
    weights = json.loads((dr_dir / "domain_weights.json").read_text())

    final_dir = runs / "final_doremi"
    final_cfg = load_config(TrainConfig(recipe="pretrain"), name, doremi.NAMED_CONFIGS,
                            [*sets, "recipe=\"pretrain\"", "domain_weights=" +
                             json.dumps(str(dr_dir / "domain_weights.json"))])
    if not (final_dir / "summary.json").is_file():
        from llmcore.training.checkpoint import list_checkpoints

        pretrain.run(final_cfg, final_dir, resume=bool(list_checkpoints(final_dir)))
    base = _figures(json.loads((dr_dir / "reference" / "summary.json").read_text()))
    mix = _figures(json.loads((final_dir / "summary.json").read_text()))
    names = sorted(base["domains"])
    res = {"config": name, "sets": args.sets, "domains": names,
           "baseline_weights": weights["baseline"], "doremi_weights": weights["weights"],
           "doremi_final_weights": weights["final"], "train_tokens": weights["train_tokens"],
           "eta": weights["eta"], "smoothing": weights["smoothing"],
           "baseline": base, "doremi": mix,
           "worst_bpb_change": mix["worst_bpb"] - base["worst_bpb"],
           "mean_bpb_change": mix["mean_bpb"] - base["mean_bpb"],
           "domains_improved": sum(mix["domains"][n] < base["domains"][n] for n in names),
           "wall_s": time.perf_counter() - t0,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads()}}
    (out / "doremi_stdlib.json").write_text(json.dumps(res, indent=1) + "\n")

    print(f"{'domain':<10} {'w base':>7} {'w doremi':>8} {'bpb base':>9} {'bpb doremi':>10} "
          f"{'xz -9e':>7}")
    for n in names:
        xz = base["xz_9e"].get(n)
        print(f"{n:<10} {weights['baseline'][n]:7.3f} {weights['weights'][n]:8.3f} "
              f"{base['domains'][n]:9.4f} {mix['domains'][n]:10.4f} "
              f"{xz if xz is None else f'{xz:7.3f}'}")
    for key in ("worst_bpb", "mean_bpb", "whole_val_bpb"):
        print(f"{key:<19} {base[key]:9.4f} {mix[key]:10.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out / 'doremi_stdlib.json'} (no plot: matplotlib is not installed)")
        return
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    x = range(len(names))
    for a, (key, ylabel) in zip(ax[:2], (("weights", "domain weight"),
                                         ("bpb", "held-out bits per byte")), strict=True):
        if key == "weights":
            pairs = (weights["baseline"], weights["weights"])
        else:
            pairs = (base["domains"], mix["domains"])
        for off, (label, vals) in zip((-0.2, 0.2), zip(("baseline (natural)", "DoReMi"), pairs,
                                                       strict=True), strict=True):
            a.bar([i + off for i in x], [vals[n] for n in names], width=0.4, label=label)
        a.set_xticks(list(x), names)
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=8)
    ax[0].set_title("mixture")
    ax[1].set_title(f"held-out bpb (worst {base['worst_bpb']:.3f} -> {mix['worst_bpb']:.3f})")
    rows = [json.loads(r) for r in (dr_dir / "proxy" / "metrics.jsonl").read_text().splitlines()
            if r.strip()]
    rows = [r for r in rows if r.get("split") != "val"]
    for i, n in enumerate(names):
        ax[2].plot([r["step"] for r in rows], [r[f"weight/{n}"] for r in rows], color=f"C{i}",
                   label=n)
    ax[2].set(title="proxy: domain weights over steps", xlabel="step")
    ax[2].grid(alpha=0.3)
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "doremi_stdlib.png", dpi=110)
    print(f"wrote {out / 'doremi_stdlib.json'} and {out / 'doremi_stdlib.png'}")


if __name__ == "__main__":
    main()
