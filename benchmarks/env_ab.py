"""A/B of an llmcore environment switch on the llmcore side of ``llmcore bench vs-llamacpp``:
the same checkpoint, prefill of 128 and 512 tokens and 64 greedy decode steps after 128,
timed by the bench's own ``llmcore_round``, in separate processes (the switches are read
once per process) alternating A, B, B, A, ... over ``--rounds`` rounds; medians.

    python benchmarks/env_ab.py --env LLMCORE_CPU_POOL=openmp [--models 110M]
        [--pairs mxint4,mxint8] [--threads 1,2] [--rounds 4] [--out FILE]

Variant A is the default environment, B sets ``--env`` (repeatable NAME=VALUE). The
switches this is for (csrc/common/parallel.h, bfp_cpu_binding.cpp): ``LLMCORE_CPU_POOL=
openmp`` (inference-mode compute kernels on torch's OpenMP threads, the rule before
llmcore's helpers took them), ``LLMCORE_GEMV_TASK_KB=32`` (fixed decode GEMV tasks),
``LLMCORE_CPU_PREFILL=gemm`` (tiled prefill through the GEMM). The checkpoints are the
bench's random-weight ones (written under ``--model-dir`` when missing). The ratio column
is A / B in tokens/s: above 1, the default is faster. A noisy machine moves both alike
within a round; the spread over rounds is in ``runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

TESTS = ("prefill128", "prefill512", "decode")


def worker(model_dir: str, pair: str, threads: int) -> None:
    """One process: load, one warm round, one timed round; prints JSON tokens/s."""
    from llmcore.bench.llamacpp import Settings, llmcore_round, load_llmcore

    model = load_llmcore(Path(model_dir), pair)
    s = Settings(threads=(threads,), rounds=1)
    r = llmcore_round(model, threads, s)
    print(json.dumps({"prefill128": r["prefill"][128], "prefill512": r["prefill"][512],
                      "decode": r["decode"]}))


def run_one(model_dir: Path, pair: str, threads: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(model_dir), pair, str(threads)]
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", action="append", required=True, help="NAME=VALUE of variant B")
    ap.add_argument("--models", default="110M")
    ap.add_argument("--pairs", default="mxint4,mxint8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                        "llmcore-vs-llamacpp"))
    ap.add_argument("--out")
    args = ap.parse_args()
    env_b = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--env wants NAME=VALUE, got {item!r}")
        env_b[name] = value
    from llmcore.bench.llamacpp import write_checkpoint

    variants = {"A default": {}, "B " + " ".join(args.env): env_b}
    names = list(variants)
    rows = []
    for model in args.models.split(","):
        folder = Path(args.model_dir) / model
        if not (folder / "config.json").exists():
            write_checkpoint(model, folder)
        for pair in args.pairs.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                runs = {n: [] for n in names}
                for r in range(args.rounds):
                    for n in (names if r % 2 == 0 else names[::-1]):
                        runs[n].append(run_one(folder, pair, threads, variants[n]))
                med = {n: {t: statistics.median(x[t] for x in runs[n]) for t in TESTS}
                       for n in names}
                row = {"model": model, "pair": pair, "threads": threads,
                       "tok_s": med, "ratio_a_over_b": {
                           t: med[names[0]][t] / med[names[1]][t] for t in TESTS},
                       "runs": runs}
                rows.append(row)
                print(f"{model} {pair} t={threads}: " + ", ".join(
                    f"{t} {med[names[0]][t]:.0f} vs {med[names[1]][t]:.0f} tok/s "
                    f"({row['ratio_a_over_b'][t]:.2f}x)" for t in TESTS), flush=True)
    out = {"benchmark": "env_ab", "variants": variants, "rounds": args.rounds,
           "order": "A B, then B A, alternating; each run its own process",
           "machine": platform.processor() or platform.machine(),
           "command": "python benchmarks/env_ab.py " + " ".join(sys.argv[1:]), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
