"""PPO on the standard-library instruction prompts: the stdlib SFT model as the policy, the
stdlib reward model plus the parse check as the reward, at two KL coefficients.

    python benchmarks/ppo_stdlib.py --sft SFT/final --rm RM/final --runs /tmp/ppo --out DIR

Writes ``DIR/ppo_stdlib.json`` (each run's summary and held-out curve) and
``DIR/ppo_stdlib.png`` (held-out score, reward-model score, parse rate and KL against
step, and the same per rollout on the training prompts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmcore.training.config import TrainConfig, load_config
from llmcore.training.recipes import ppo

KL_COEFS = (0.05, 0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True, help="the SFT model directory (the policy)")
    ap.add_argument("--rm", required=True, help="the reward model directory")
    ap.add_argument("--runs", required=True, help="folder for the run directories")
    ap.add_argument("--out", required=True, help="folder for the JSON and the plot")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for kl in KL_COEFS:
        run = runs / f"kl{kl}"
        if not (run / "summary.json").is_file():
            sets = [f"init_from={json.dumps(args.sft)}", f"ppo.reward_model={json.dumps(args.rm)}",
                    f"ppo.kl_coef={kl}", "tensorboard=false"]
            cfg = load_config(TrainConfig(recipe="ppo"), "stdlib", ppo.NAMED_CONFIGS, sets)
            ppo.run(cfg, run)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        res[f"kl_coef={kl}"] = {
            "summary": json.loads((run / "summary.json").read_text()),
            "val": [r for r in rows if r.get("split") == "val"],
            "rollouts": [{k: r[k] for k in ("step", "objective/kl", "objective/scores",
                                            "rollout/rm_score", "rollout/parse_rate",
                                            "rollout/length")}
                         for r in rows if r.get("split") != "val" and (r["step"] - 1) % 16 == 0]}
    (out / "ppo_stdlib.json").write_text(json.dumps(res, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.8))
    for name, r in res.items():
        ro = r["rollouts"]
        for a, key, vkey in zip(ax, ("rollout/rm_score", "rollout/parse_rate",
                                     "objective/kl", "rollout/length"),
                                ("val_rm_score", "val_parse_rate", "val_kl", "val_length"),
                                strict=True):
            line, = a.plot([x["step"] for x in ro], [x[key] for x in ro], alpha=0.5,
                           label=f"{name} (train rollouts)")
            a.plot([x["step"] for x in r["val"]], [x[vkey] for x in r["val"]], "o-",
                   color=line.get_color(), label=f"{name} (held out)")
            a.set(title=key.split("/")[1], xlabel="step")
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppo_stdlib.png", dpi=110)
    print(f"{'run':<14} {'step':>5} {'rm score':>9} {'parse':>6} {'KL':>7} {'length':>7}")
    for name, r in res.items():
        for v in r["val"]:
            print(f"{name:<14} {v['step']:>5} {v['val_rm_score']:9.3f} {v['val_parse_rate']:6.3f} "
                  f"{v['val_kl']:7.3f} {v['val_length']:7.1f}")
    print(f"wrote {out / 'ppo_stdlib.json'} and {out / 'ppo_stdlib.png'}")


if __name__ == "__main__":
    main()
