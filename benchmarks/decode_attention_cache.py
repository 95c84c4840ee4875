"""CPU decode attention (``llmcore::decode_attention``, batch 1, one new token) as a decode
step meets it: the cache of one layer read from L2, from a 12-layer cache cycled layer by
layer (as a step walks its layers), from DRAM (a 120 MB buffer written between steps:
torch's fill, on OpenMP threads, leaving dirty lines), and ``streamed``: each layer's call
after a GEMV (``llmcore::linear_gemv``) that reads 6 MB of fresh bf16 weights, as a
step's projections do between its attention calls (only the attention is timed).

    python benchmarks/decode_attention_cache.py --threads 1 2 --context 160 \
        [--dtype float16] [--heads 12] [--head-dim 64] [--rounds 7] [--rows 1 5] \
        [--out X.json]

Per setting: microseconds per layer (median over rounds; the Python call, ~10-15 us, is
included, as it is in a step) and the K/V bytes read per microsecond. ``--rows 1 5`` also
times calls of 5 new tokens (a verification of 4 drafts: the last 5 positions of the
context, causal among themselves) in the same rounds, alternated with the 1-row calls,
and reports each setting's ratio to the 1-row call. Run two builds in
alternation (``PYTHONPATH=<checkout>``) to compare kernels on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import llmcore  # noqa: F401  (registers torch.ops.llmcore)

LAYERS = 12


def measure(threads: int, context: int, dtype: torch.dtype, heads: int, head_dim: int,
            rounds: int, rows: int = 1) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    cap = context + 16
    shape = (LAYERS, 1, cap, heads, head_dim)
    kc = torch.randn(shape, generator=g).to(dtype)
    vc = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(1, rows, heads, head_dim, generator=g)
    lens = torch.tensor([context], dtype=torch.int32)
    big = torch.empty(120_000_000, dtype=torch.uint8)
    op = torch.ops.llmcore.decode_attention
    scale = head_dim ** -0.5

    def layer(i: int) -> None:
        op(q, kc[i], vc[i], lens, scale, None, None, None)

    # streamed: between layers a dense GEMV reads the next 6 MB of a 72 MB weight (read
    # only, on llmcore's helpers), as a step's projections do; only the attention is timed.
    wrows = 6_000_000 // (2 * 768)
    weights = [torch.randn(wrows, 768, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    x = torch.randn(1, 768).to(torch.bfloat16)
    gemv = torch.ops.llmcore.linear_gemv
    times: dict[str, list[float]] = {"l2_hot": [], "layers_cycled": [], "dram_cold": [],
                                     "streamed": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(20 * LAYERS):
            layer(0)
        times["l2_hot"].append((time.perf_counter() - t0) / (20 * LAYERS))
        t0 = time.perf_counter()
        for _ in range(20):
            for i in range(LAYERS):
                layer(i)
        times["layers_cycled"].append((time.perf_counter() - t0) / (20 * LAYERS))
        total = 0.0
        for r in range(5):
            big.fill_(r)  # evict the caches, as a step's weights do
            t0 = time.perf_counter()
            for i in range(LAYERS):
                layer(i)
            total += time.perf_counter() - t0
        times["dram_cold"].append(total / (5 * LAYERS))
        total = 0.0
        for _ in range(5):
            for i in range(LAYERS):
                gemv(x, weights[i], None)
                t0 = time.perf_counter()
                layer(i)
                total += time.perf_counter() - t0
        times["streamed"].append(total / (5 * LAYERS))
    kv_bytes = 2 * context * heads * head_dim * kc.element_size()
    out = {}
    for k, v in times.items():
        s = statistics.median(v)
        out[k] = {"us_per_layer": s * 1e6, "kv_GBps": kv_bytes / s / 1e9,
                  "runs_us": [x * 1e6 for x in v]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float16")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[1],
                    help="new tokens per call; several: each round runs each in turn")
    ap.add_argument("--out")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    res = {"settings": {"context": a.context, "dtype": a.dtype, "heads": a.heads,
                        "head_dim": a.head_dim, "layers": LAYERS, "rounds": a.rounds,
                        "rows": a.rows},
           "threads": {}}
    for t in a.threads:
        # One round at a time per rows value, in turn, so the machine's swings fall on all.
        runs: dict[int, list[dict]] = {r: [] for r in a.rows}
        for _ in range(a.rounds):
            for r in a.rows:
                runs[r].append(measure(t, a.context, dtype, a.heads, a.head_dim, 1, r))
        for r in a.rows:
            row = {k: {"us_per_layer": statistics.median(x[k]["us_per_layer"] for x in runs[r]),
                       "kv_GBps": statistics.median(x[k]["kv_GBps"] for x in runs[r]),
                       "runs_us": [x[k]["us_per_layer"] for x in runs[r]]}
                   for k in runs[r][0]}
            if r != a.rows[0]:
                base = res["threads"][str(t)] if len(a.rows) == 1 else \
                    res["threads"][str(t)][f"rows_{a.rows[0]}"]
                for k, v in row.items():
                    v[f"ratio_to_rows_{a.rows[0]}"] = v["us_per_layer"] / base[k]["us_per_layer"]
            if len(a.rows) == 1:
                res["threads"][str(t)] = row
            else:
                res["threads"].setdefault(str(t), {})[f"rows_{r}"] = row
            print(f"threads {t} rows {r}: " + "  ".join(
                f"{k} {v['us_per_layer']:.1f} us ({v['kv_GBps']:.1f} GB/s)"
                + (f" {v[f'ratio_to_rows_{a.rows[0]}']:.2f}x" if r != a.rows[0] else "")
                for k, v in row.items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
