"""Post-training on the standard library, end to end: SFT, then a reward model and the
preference recipes (DPO, IPO, hinge, SLiC-HF) from the SFT model, with a table and a plot
of the held-out figures before and after.

    python benchmarks/posttrain_stdlib.py --init RUN/final --runs /tmp/post --out DIR

``--init`` is the pretrained model (``llmcore train pretrain --config stdlib``); every run
uses the recipe's ``stdlib`` named config. Writes ``DIR/posttrain_stdlib.json`` (the
summaries of every run), ``DIR/posttrain_stdlib_metrics.jsonl`` (every logged row) and
``DIR/posttrain_stdlib.png``. A rerun skips the runs that finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmcore.training.config import TrainConfig, load_config
from llmcore.training.recipes import RECIPES

PREFERENCE = ("dpo", "ipo", "hinge", "slic")


def _run(recipe: str, out: Path, sets: list[str]) -> dict:
    if (out / "summary.json").is_file():  # done before: keep it (a rerun resumes the rest)
        return json.loads((out / "summary.json").read_text())
    mod = RECIPES[recipe]
    cfg = load_config(TrainConfig(recipe=recipe), "stdlib", mod.NAMED_CONFIGS, sets)
    t0 = time.perf_counter()
    mod.run(cfg, out, resume=(out / "checkpoints").is_dir())
    s = json.loads((out / "summary.json").read_text())
    s["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    return s


def _rows(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return ([r for r in rows if r.get("split") != "val"],
            [r for r in rows if r.get("split") == "val"])


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1])
            for i in range(len(xs))]


def plot(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    t, v = _rows(runs / "sft")
    ax[0, 0].plot([r["step"] for r in t], _smooth([r["loss"] for r in t]), label="train")
    ax[0, 0].plot([r["step"] for r in v], [r["val_loss"] for r in v], "o-", label="held out")
    ax[0, 0].set(title="SFT: answer-token loss", xlabel="step", ylabel="nats/token")
    t, v = _rows(runs / "reward")
    ax[0, 1].plot([r["step"] for r in t], _smooth([r["accuracy"] for r in t], 20),
                  label="train (smoothed)")
    ax[0, 1].plot([r["step"] for r in v], [r["val_accuracy"] for r in v], "o-", label="held out")
    ax[0, 1].set(title="Reward model: pair accuracy", xlabel="step", ylim=(0.4, 1.0))
    for lt in PREFERENCE:
        t, v = _rows(runs / lt)
        key = "logps/accuracies" if lt == "slic" else "rewards/accuracies"
        ax[1, 0].plot([r["step"] for r in t], _smooth([r[key] for r in t], 20), label=lt)
        ax[1, 1].plot([r["step"] for r in v], [r["val_logps/accuracies"] for r in v], "o-",
                      label=lt)
    ax[1, 0].set(title="Preference: train accuracy (implicit reward; SLiC: log-prob), "
                 "smoothed", xlabel="step")
    ax[1, 1].set(title="Preference: held-out log P(chosen) > log P(rejected)", xlabel="step")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out / "posttrain_stdlib.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="the pretrained model directory")
    ap.add_argument("--runs", required=True, help="folder for the run directories")
    ap.add_argument("--out", required=True, help="folder for the JSON and the plot")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["tensorboard=false"]
    res = {"init": args.init}
    res["sft"] = _run("sft", runs / "sft", [f"init_from={json.dumps(args.init)}", *quiet])
    sft_final = json.dumps(str(runs / "sft" / "final"))
    res["reward"] = _run("reward", runs / "reward", [f"init_from={sft_final}", *quiet])
    for lt in PREFERENCE:
        res[lt] = _run("dpo", runs / lt, [f"init_from={sft_final}", f"loss_type={json.dumps(lt)}",
                                          *quiet])
    (out / "posttrain_stdlib.json").write_text(json.dumps(res, indent=1) + "\n")
    with open(out / "posttrain_stdlib_metrics.jsonl", "w", encoding="utf-8") as f:
        for name in ("sft", "reward", *PREFERENCE):  # every logged row, with its run
            for line in (runs / name / "metrics.jsonl").read_text().splitlines():
                f.write(json.dumps({"run": name, **json.loads(line)}) + "\n")
    plot(runs, out)
    print(f"{'run':<8} {'metric':<28} {'before':>8} {'after':>8}")
    for name, key in (("sft", "val_loss"), ("reward", "val_accuracy"),
                      *[(lt, "val_logps/accuracies") for lt in PREFERENCE],
                      *[(lt, "val_sft_loss") for lt in PREFERENCE]):
        b, a = res[name]["before"][key], res[name]["after"][key]
        print(f"{name:<8} {key:<28} {b:8.4f} {a:8.4f}")
    print(f"wrote {out / 'posttrain_stdlib.json'} and {out / 'posttrain_stdlib.png'}")


if __name__ == "__main__":
    main()
