"""AlpaGasus on the standard library: does SFT on the instruction rows a judge scores best
beat SFT on all of them, at the same number of steps?

    python benchmarks/alpagasus_stdlib.py --init RUN/final --rm RM/final --runs DIR --out DIR

The stdlib SFT rows are scored by the reward model (``llmcore data filter --judge rm:RM
--keep-fraction F``); three SFT runs start from the same pretrained model with the stdlib
config at ``--steps`` steps: on all rows, on the kept rows, and on a random subset of the
same size (the control that separates "better rows" from "fewer rows"). Each model then
answers the held-out prompts greedily; reported per run: held-out answer-token loss (on
the unfiltered val rows), the reward model's mean score and the parse rate of the answers,
and the win rates filtered vs full and filtered vs random, judged pairwise by the reward
model and by the parse check (both orders, ties half). The reward model judges the rows it
filtered, so its verdict favours the filtered run by construction; the loss and the parse
rate are the independent figures. Writes ``DIR/alpagasus_stdlib.json``; a rerun skips the
finished runs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posttrain_stdlib import _run  # noqa: E402  (the sibling benchmark's resumable run)


def _subsets(src: Path, rm: str, keep: float, runs: Path) -> dict:
    from llmcore.evaluation.filtering import write_filtered
    from llmcore.evaluation.judges import make_judge

    filt, rand = runs / "data_filtered", runs / "data_random"
    if not (filt / "filter.json").is_file():
        write_filtered(src, filt, make_judge(f"rm:{rm}"), keep_fraction=keep, skip_bad_rows=True)
    report = json.loads((filt / "filter.json").read_text())
    if not (rand / "train.jsonl").is_file():
        lines = (src / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        n = sum(1 for _ in (filt / "train.jsonl").open(encoding="utf-8"))
        rand.mkdir(parents=True, exist_ok=True)
        pick = sorted(random.Random(0).sample(range(len(lines)), n))
        (rand / "train.jsonl").write_text("".join(lines[i] for i in pick), encoding="utf-8")
        shutil.copyfile(src / "val.jsonl", rand / "val.jsonl")
    return {"full": src, "filtered": filt, "random": rand, "filter": report}


def _answers(run: Path, prompts: list[str], max_new: int) -> list[str]:
    from llmcore.evaluation.win_rate import generate_answers
    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer

    path = run / "final"
    cache = run / "heldout_answers.json"
    if cache.is_file():
        got = json.loads(cache.read_text())
        if got["prompts"] == prompts and got["max_new_tokens"] == max_new:
            return got["answers"]
    model = Transformer.from_pretrained(str(path)).eval()
    ans = generate_answers(model, load_tokenizer(str(path)), prompts, max_new, batch_size=8)
    cache.write_text(json.dumps({"prompts": prompts, "max_new_tokens": max_new,
                                 "answers": ans}) + "\n")
    return ans


def main() -> None:
    from llmcore.data.examples import read_rows
    from llmcore.data.prepare import ensure_stdlib_task
    from llmcore.evaluation.judges import CodeJudge, RewardModelJudge
    from llmcore.evaluation.win_rate import PointwisePairwise, win_rate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="the pretrained stdlib model (RUN/final)")
    ap.add_argument("--rm", required=True, help="the stdlib reward model (RUN/final)")
    ap.add_argument("--runs", required=True, help="folder for the subsets and the three runs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep-fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts answered")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    src = ensure_stdlib_task("sft")
    data = _subsets(src, args.rm, args.keep_fraction, runs)

    res: dict = {"init": args.init, "rm": args.rm, "steps": args.steps,
                 "keep_fraction": args.keep_fraction, "filter": data.pop("filter"), "runs": {}}
    for name, folder in data.items():
        sets = [f"init_from={json.dumps(args.init)}", f"data={json.dumps(str(folder))}",
                f"steps={args.steps}", "tensorboard=false"]
        res["runs"][name] = _run("sft", runs / name, sets)

    rows = read_rows(src / "val.jsonl", "sft")
    prompts = [r.data["prompt"] for r in rows if len(r.data["prompt"]) < 600][:args.prompts]
    rm, code = RewardModelJudge.from_pretrained(args.rm), CodeJudge(1.0, 0.0, run_doctests=False)
    answers = {name: _answers(runs / name, prompts, args.max_new_tokens) for name in data}
    table = {}
    for name, ans in answers.items():
        s = res["runs"][name]
        table[name] = {"train_rows": s["data"]["train"], "val_loss": s["after"]["val_loss"],
                       "rm_score": statistics.mean(rm.score_many(prompts, ans)),
                       "parse_rate": statistics.mean(code.score_many(prompts, ans))}
    res["table"], res["win_rates"] = table, {}
    for judge_name, judge in (("rm", PointwisePairwise(rm)), ("parse", PointwisePairwise(code))):
        for other in ("full", "random"):
            r = win_rate(prompts, answers["filtered"], answers[other], judge, resamples=2000)
            res["win_rates"][f"filtered vs {other} ({judge_name})"] = {
                k: r[k] for k in ("win_rate", "ci", "lc_win_rate", "n") if k in r}
    res["prompts"], res["max_new_tokens"] = len(prompts), args.max_new_tokens
    out.mkdir(parents=True, exist_ok=True)
    (out / "alpagasus_stdlib.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    f = res["filter"]
    print(f"reward-model filter: kept {f['kept']:,} of {f['rows']:,} rows (score >= "
          f"{f['threshold']:.3f})")
    print(f"{'run':<9} {'rows':>6} {'val loss':>9} {'rm score':>9} {'parse':>6}")
    for name, t in table.items():
        print(f"{name:<9} {t['train_rows']:>6} {t['val_loss']:9.4f} {t['rm_score']:9.3f} "
              f"{t['parse_rate']:6.3f}")
    for k, v in res["win_rates"].items():
        print(f"{k:<30} {v['win_rate']:.3f}  [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]")
    print(f"wrote {out / 'alpagasus_stdlib.json'}")


if __name__ == "__main__":
    main()
