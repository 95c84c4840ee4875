"""Where an assisted-generation round spends its time, with a trained pair (1 thread).

    python benchmarks/assisted_round.py --target RUN/final --draft DRAFT/final
        [--precision mxint8] [--gamma 3] [--prompts 4] [--new 96] [--reps 3] [--out X.json]

The prompts are ``llmcore bench assisted``'s (held-out windows of the stdlib corpus,
tokenised with the target's tokenizer); target and draft are quantised to ``--precision``
(``fp32`` keeps them dense). Each repetition runs ``assisted_generate`` (constant γ) on
every prompt, then plain greedy ``generate`` on the same prompts, and reports the
speed-up and the time per round (target call) in: the target's calls (``feed``:
verification, and the prompt's prefill), the drafter's ``propose`` and ``prefill``, the
proposals' check, the verification bookkeeping (``_verify``), and the rest (Python of the
loop). The parts are timed by wrapping those functions, so the wrappers' cost (about a
microsecond a call) falls on them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--precision", default="mxint8", choices=["fp32", "mxint8", "mxint4"])
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)

    import llmcore.generation.assisted as assisted
    import llmcore.generation.drafters as drafters
    from llmcore.bench.assisted import heldout_prompts, load_pair
    from llmcore.generation import assisted_generate, generate

    target, draft, tok = load_pair(a.target, a.draft, "cpu")
    if a.precision != "fp32":
        target, draft = target.quantized(a.precision).eval(), draft.quantized(a.precision).eval()
    prompts = [torch.tensor([p]) for _, p in heldout_prompts(tok, a.prompts, a.prompt_tokens,
                                                              a.val_fraction)]
    spent: dict[str, float] = {}

    def timed(owner, name: str, key: str) -> None:
        f = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)

    timed(drafters.ModelDrafter, "propose", "propose")
    timed(drafters.ModelDrafter, "prefill", "draft prefill")
    timed(assisted, "feed", "target calls (verify + prefill)")
    timed(assisted, "_check_proposals", "check proposals")
    timed(assisted, "_verify", "verify bookkeeping")

    reps = []
    for _ in range(a.reps):
        spent.clear()
        total = rounds = 0
        for p in prompts:
            t = time.perf_counter()
            _, stats = assisted_generate(target, draft, p, a.new, num_draft_tokens=a.gamma,
                                         schedule="constant")
            total += time.perf_counter() - t
            rounds += stats.target_calls
        t = time.perf_counter()
        for p in prompts:
            generate(target, p, a.new)
        plain = time.perf_counter() - t
        parts = {k: v * 1e3 / rounds for k, v in spent.items()}
        parts["rest (loop Python)"] = (total - sum(spent.values())) * 1e3 / rounds
        reps.append({"assisted_ms": total * 1e3, "plain_ms": plain * 1e3,
                     "speedup": plain / total, "rounds": rounds, "ms_per_round": parts})
        print(f"assisted {total * 1e3:.0f} ms in {rounds} rounds, plain {plain * 1e3:.0f} ms, "
              f"x{plain / total:.2f}; ms a round: "
              + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "assisted_round", "args": vars(a), "reps": reps}, f,
                      indent=1)


if __name__ == "__main__":
    main()
