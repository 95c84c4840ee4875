"""Spending samples at inference on the stdlib instruction prompts: first drafts vs
self-correction vs best-of-N at the same budget of samples, judged by the stdlib reward
model plus the parse check (the reward of the PPO run).

    python benchmarks/rerank_stdlib.py --sft SFT/final --rm RM/final [--ppo PPO/final] --out DIR

Writes ``DIR/rerank_stdlib.json``: per method, the mean reward-model score and the parse
rate of the final answers to the held-out prompts (and the PPO policy's first drafts when
``--ppo`` is given).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from llmcore.evaluation.judges import CodeJudge, Judge, RewardModelJudge


class RewardPlusParse(Judge):
    """The PPO reward: reward-model score + 1 when the answer parses."""

    def __init__(self, rm: RewardModelJudge):
        self.rm, self.code = rm, CodeJudge(1.0, 0.0, run_doctests=False)

    def score_many(self, prompts, answers):
        return [r + c for r, c in zip(self.rm.score_many(prompts, answers),
                                      self.code.score_many(prompts, answers), strict=True)]

    def feedback(self, prompt, answer):
        return self.code.feedback(prompt, answer)


def main() -> None:
    from llmcore.data.examples import read_rows
    from llmcore.data.prepare import ensure_stdlib_task
    from llmcore.generation import best_of_n, self_correct
    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--ppo", help="a PPO policy to compare (first drafts)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--budget", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    rows = read_rows(ensure_stdlib_task("sft") / "val.jsonl", "sft")
    prompts = [r.data["prompt"] for r in rows if len(r.data["prompt"]) < 600][:args.prompts]
    tok = load_tokenizer(args.sft)
    rm = RewardModelJudge.from_pretrained(args.rm)
    judge, code, kw = RewardPlusParse(rm), CodeJudge(1.0, 0.0, run_doctests=False), \
        {"max_new_tokens": args.max_new_tokens}

    def summary(pairs):
        ps, ans = [p for p, _ in pairs], [a for _, a in pairs]
        return {"rm_score": statistics.mean(rm.score_many(ps, ans)),
                "parse_rate": statistics.mean(code.score_many(ps, ans)), "answers": len(ans)}

    res = {"prompts": len(prompts), "budget": args.budget, "judge": "reward model + parse"}
    models = {"sft": Transformer.from_pretrained(args.sft)}
    if args.ppo:
        models["ppo"] = Transformer.from_pretrained(args.ppo)
    for name, model in models.items():
        first = [(p, best_of_n(model, tok, p, 1, judge, temperature=0.7, seed=i, **kw)["best"])
                 for i, p in enumerate(prompts)]
        res[f"{name}: first draft"] = summary(first)
    model = models["sft"]
    res["sft: self-correct"] = summary([(p, self_correct(
        model, tok, p, judge, rounds=args.budget - 1, temperature=0.7, seed=i, **kw)["final"])
        for i, p in enumerate(prompts)])
    res["sft: best-of-N"] = summary([(p, best_of_n(
        model, tok, p, args.budget, judge, temperature=0.7, seed=i, **kw)["best"])
        for i, p in enumerate(prompts)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerank_stdlib.json").write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k:<22} rm score {v['rm_score']:7.3f}   parse rate {v['parse_rate']:.3f}")
    print(f"wrote {out / 'rerank_stdlib.json'}")


if __name__ == "__main__":
    main()
