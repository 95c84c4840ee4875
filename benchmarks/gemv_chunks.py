"""How the decode GEMV's work is cut into tasks, measured: fixed 32 KB tasks (the old rule,
``LLMCORE_GEMV_TASK_KB=32``) against tasks of a quarter of each thread's share of the
weight (the default, ``common/parallel.h: gemv_task_bytes``).

    python benchmarks/gemv_chunks.py [--rounds 3] [--threads 1,2] [--out FILE]

A decode GEMV streams its weight once, so its speed is the bandwidth the threads get
from memory. Tasks go to the threads as they ask (common/chunk_pool.h); with 32 KB tasks
the two threads of a 2-core VM take alternate ones, each thread's reads jump over its
neighbour's, and its prefetches run into the other thread's task. Each (shape, format,
threads) is timed on the int8-activation GEMV the decoder runs
(``bfp_act_linear_multi`` on weights in the GEMV tile layout, M = 1; median of 5 batches
of ~0.15 s), the weights rotating
over copies filling 80 MB so every call reads them from memory; GB/s of weight bytes
(mantissas + exponents). Each variant runs in its own process (the rule is read once per
process), the variants alternating A, B, B, A, ... over ``--rounds`` rounds; medians. At one
thread the rule changes nothing (one task): those rows show the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = {"110M qkv 2304x768": (2304, 768), "110M gate/up 4096x768": (4096, 768),
          "110M head 32000x768": (32000, 768), "1B gate/up 8192x2048": (8192, 2048)}
FORMATS = {"mxint8": 8, "mxint4": 4}
VARIANTS = {"fixed 32 KB": "32", "quarter share": None}


def worker(threads: list[int]) -> None:
    """One round of every (shape, format, threads) in this process: prints JSON GB/s."""
    import torch

    import llmcore  # noqa: F401  (loads the extension)
    from llmcore.formats import get_format
    from llmcore.ops.bfp import bfp_quantize

    torch.manual_seed(0)
    op = torch.ops.llmcore.bfp_act_linear_multi
    out = {}
    for shape, (n, k) in SHAPES.items():
        for fmt, bits in FORMATS.items():
            nbytes = n * k * bits // 8 + n * (k // 32)
            ws = []
            for _ in range(max(2, -(-(80 << 20) // nbytes))):
                q = bfp_quantize(torch.randn(n, k) * 0.02, get_format(fmt))
                ws.append(torch.ops.llmcore.bfp_tiles_pack(q.mantissa, q.exponent, bits, 32))
            x = torch.randn(1, 1, k).bfloat16()
            for t in threads:
                torch.set_num_threads(t)
                calls = max(20, int(0.15 * 20e9 / nbytes))  # ~0.15 s at 20 GB/s
                for i in range(10):
                    tm, te = ws[i % len(ws)]
                    op(x, [tm], [te], 8, bits, 32, False, [None])
                rates = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for i in range(calls):
                        tm, te = ws[i % len(ws)]
                        op(x, [tm], [te], 8, bits, 32, False, [None])
                    rates.append(nbytes * calls / (time.perf_counter() - t0) / 1e9)
                out[f"{shape}|{fmt}|{t}"] = statistics.median(rates)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    if a.worker:
        worker(threads)
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        order = list(VARIANTS.items())
        for name, kb in order if r % 2 == 0 else order[::-1]:  # A B, B A, ...: no order bias
            env = {k: v for k, v in os.environ.items() if k != "LLMCORE_GEMV_TASK_KB"}
            if kb:
                env["LLMCORE_GEMV_TASK_KB"] = kb
            p = subprocess.run([sys.executable, __file__, "--worker", "--threads", a.threads],
                               capture_output=True, text=True, env=env, check=True)
            line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
            runs[name].append(json.loads(line[len("RESULT "):]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    keys = list(runs["fixed 32 KB"][0])
    table = {}
    print(f"{'shape':24s} {'fmt':7s} t  {'32 KB tasks':>12s} {'quarter share':>14s}  ratio")
    for key in keys:
        a32, aq = (statistics.median(x[key] for x in runs[v]) for v in VARIANTS)
        shape, fmt, t = key.split("|")
        table[key] = {"fixed_32KB_GBps": a32, "quarter_share_GBps": aq, "ratio": aq / a32,
                      "samples": {v: [x[key] for x in runs[v]] for v in VARIANTS}}
        print(f"{shape:24s} {fmt:7s} {t}  {a32:10.1f}   {aq:12.1f}   {aq / a32:5.2f}x")
    res = {"command": "python benchmarks/gemv_chunks.py " + " ".join(sys.argv[1:]),
           "machine": platform.processor() or platform.machine(), "rounds": a.rounds,
           "unit": "GB/s of weight bytes, M = 1, tile layout, int8 activations",
           "results": table}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
