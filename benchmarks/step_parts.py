"""Where one cached decode step's wall time goes, piece by piece, as the step meets it: the
Python around ``llmcore::decoder_layers`` and the head runs right after ~70 MB of weights
have streamed through the caches, so each small op pays for cold code and data.

    python benchmarks/step_parts.py CHECKPOINT [--format mxint4] [--threads 2] [--steps 200]

Runs the pieces of ``Transformer.forward``'s cached CPU path (checks, ``cache.prepare``,
positions, embedding, RoPE tables, the plan check, the layers op, the head, ``commit``,
greedy pick) one after the other with a timer between them, for ``--steps`` greedy steps
(the cache rolled back when it fills), and prints each piece's median in microseconds.
It mirrors ``Transformer.forward`` (llmcore/models/transformer.py) line by line and reads
its private helpers: when that method changes, change this script with it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import llmcore.models.transformer as tr
from llmcore.models import Transformer
from llmcore.ops.fused import argmax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--format", default="mxint4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--storage", default="float16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = Transformer.from_pretrained(a.checkpoint, quantize=a.format)
    cache = model.new_cache(1, 800, storage=a.storage)
    prompt = torch.randint(0, model.config.vocab_size, (1, 128),
                           generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        times.setdefault(name, []).append((t1 - t0) * 1e6)
        return t1

    def step(m: Transformer, ids: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        keep = tr._check_keep(0, ids)
        tr._check_ids(ids, m.config.vocab_size)
        t = tick("checks", t)
        cache.prepare(1, prefill=False, want_positions=False)
        t = tick("cache.prepare", t)
        positions = cache.positions(1)
        t = tick("positions", t)
        x = m.embed_tokens(ids)
        t = tick("embedding", t)
        cos, sin = m.rope(positions, x.dtype, cache.end)
        t = tick("rope tables", t)
        if m._decoder_layers.__func__ is not Transformer._decoder_layers:
            raise RuntimeError("Transformer._decoder_layers changed: update this script")
        plan = m._plan
        if plan is None or not plan.valid(x.dtype) or not plan.covered:
            raise RuntimeError("the model takes no decoder_layers plan here")
        t = tick("plan check", t)
        h = torch.ops.llmcore.decoder_layers(
            x, cos, sin, plan.weights, cache.k_values, cache.v_values, cache.k_exponents,
            cache.v_exponents, cache._seq, cache._table, 1.0 / math.sqrt(cache.head_dim))
        t = tick("decoder_layers op", t)
        logits = tr.dense(m.lm_head, tr._kept(h, keep))
        t = tick("head", t)
        cache.commit()
        t = tick("cache.commit", t)
        nxt = argmax(logits[:, -1:])
        tick("greedy pick", t)
        return nxt

    with torch.inference_mode():
        model(prompt, cache=cache, prefill=True)
        tok = prompt[:, -1:]
        for _ in range(10):  # builds the plan, warms up
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
        start = cache.lengths[0]
        for _ in range(a.steps):
            if cache.lengths[0] > 700:
                cache.rollback(start)
            tok = step(model, tok)
    total = 0.0
    print(f"{a.checkpoint} {a.format}, {a.threads} thread(s), median of {a.steps} steps:")
    for name, v in times.items():
        med = statistics.median(v)
        total += med
        print(f"  {name:18s} {med:8.1f} us")
    print(f"  {'sum':18s} {total:8.1f} us")


if __name__ == "__main__":
    main()
