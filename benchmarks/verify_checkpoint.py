"""Verify cost of a checkpoint on the CPU: one step of T new tokens (verifying T - 1 drafts
of assisted generation) against one single-token step, at the same context.

    python benchmarks/verify_checkpoint.py CHECKPOINT [--format mxint8] [--tokens 5]
        [--threads 1 2] [--rounds 3] [--storage float16] [--out X.json]

Loads CHECKPOINT with ``Transformer.from_pretrained(quantize=FORMAT)`` (``none``: as
stored), fills a KV cache with a 128-token prompt, then per round and thread count times
single-token steps and steps of T tokens alternated, each rolled back to the prompt
(``decode_overhead.verify_ratio``, ``--reps`` pairs); prints the medians over rounds and
their ratio. ``llmcore bench vs-llamacpp`` leaves its checkpoints (110M, 1B)
in ``<tmp>/llmcore-vs-llamacpp/``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from decode_overhead import verify_ratio

from llmcore.models import Transformer

PROMPT = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--format", default="mxint8")
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--storage", default="float16")
    ap.add_argument("--out")
    a = ap.parse_args()
    model = Transformer.from_pretrained(a.checkpoint,
                                        quantize=None if a.format == "none" else a.format)
    cache = model.new_cache(1, PROMPT + 16 + a.tokens, storage=a.storage)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(0))
    key = f"verify_{a.tokens}_ms"
    runs: dict[int, list[dict]] = {t: [] for t in a.threads}
    for _ in range(a.rounds):
        for t in a.threads:
            torch.set_num_threads(t)
            runs[t].append(verify_ratio(model, cache, ids, a.tokens, reps=a.reps))
    res = {"checkpoint": a.checkpoint, "format": a.format, "tokens": a.tokens,
           "storage": a.storage, "threads": {}}
    for t, v in runs.items():
        step = statistics.median(x["step_ms"] for x in v)
        ver = statistics.median(x[key] for x in v)
        res["threads"][str(t)] = {"step_ms": step, key: ver, "ratio": ver / step, "runs": v}
        print(f"threads {t}: step {step:.1f} ms, {a.tokens} tokens {ver:.1f} ms, "
              f"ratio {ver / step:.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
