"""The CPU decode GEMV (int8 activations x BFP weights) against the memory bandwidth.

A decode GEMV reads every weight byte once per call, so its roofline is the machine's
streaming-read bandwidth. This measures both, in rounds that interleave everything:

* ``membw``: benchmarks/membw.cpp (compiled here with g++), a streaming read of a buffer
  far larger than the last-level cache, at each thread count: the target.
* ``gemv``: ``torch.ops.llmcore.bfp_gemm`` with 8-bit activations (what
  ``bfp_linear(..., act_format="mxint8")`` runs for M <= 16) on the projection shapes of
  a 110M Llama (dim 768, MLP 2048 / 3072, vocab 32000) and of Llama-3.2-1B (dim 2048,
  K/V 512, MLP 8192, vocab 128256), MXINT8 and MXINT4 weights, M = 1 and 5 (one decode
  step; verifying gamma = 4 drafts), at each thread count, as GB/s of weight bytes
  (mantissas + exponents) per wall second. Weights rotate over more than twice the
  last-level cache, so every call reads them from memory.

``--kind dense`` measures the dense decode GEMV instead: ``torch.ops.llmcore.linear_gemv``
against ``F.linear`` (what a bf16/fp32 model ran before it) on the same shapes, bf16 and
fp32 weights, the two called in turn within each timed batch; GB/s of weight bytes.

Each variant (``--variant NAME=DIR``: DIR holds the ``llmcore`` package to import, e.g. a
copy of the package with an older build of the extension) runs in its own process, one
process per round and variant, in the order A, B, A, B, ...; medians over rounds.

Run from the repository root:
  python benchmarks/gemv_bandwidth.py [--quick] [--rounds 5] [--threads 1,2]
      [--variant before=/tmp/old --variant after=.] [--kind bfp|dense] [--out FILE]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {  # name: (N, K)
    "110M qkvo 768x768": (768, 768),
    "110M gate/up 2048x768": (2048, 768),
    "110M down 768x2048": (768, 2048),
    "110M up 3072x768": (3072, 768),
    "110M down 768x3072": (768, 3072),
    "110M head 32000x768": (32000, 768),
    "1B q/o 2048x2048": (2048, 2048),
    "1B k/v 512x2048": (512, 2048),
    "1B gate/up 8192x2048": (8192, 2048),
    "1B down 2048x8192": (2048, 8192),
    "1B head 128256x2048": (128256, 2048),
}
QUICK = ("110M qkvo 768x768", "110M head 32000x768", "1B gate/up 8192x2048")
FORMATS = {"mxint8": 8, "mxint4": 4}
DENSE = ("bf16 linear_gemv", "bf16 F.linear", "fp32 linear_gemv", "fp32 F.linear")


def llc_bytes() -> int:
    try:
        s = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(s.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    except OSError:
        return 32 << 20


def _time(calls: dict, seconds: float, count: int) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` (name -> f(i)), the batches of the
    different calls interleaved."""
    per = {}
    for name, call in calls.items():
        call(0)
        w0 = time.perf_counter()
        call(1)
        per[name] = max(count, min(400, int(seconds / max(time.perf_counter() - w0, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    i = 2
    for _ in range(3):  # median of three batches
        for name, call in calls.items():
            w0 = time.perf_counter()
            for _ in range(per[name]):
                call(i)
                i += 1
            samples[name].append((time.perf_counter() - w0) / per[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def dense_worker(args) -> None:
    """One round of --kind dense: linear_gemv and F.linear in turn, per (shape, dtype, M,
    threads); prints a JSON dict of ms."""
    import torch
    import torch.nn.functional as F

    import llmcore  # noqa: F401  (loads the extension)

    torch.manual_seed(0)
    gemv = torch.ops.llmcore.linear_gemv
    rotate = 2 * llc_bytes()
    out = {}
    for shape in args.shapes.split(";"):
        n, k = SHAPES[shape]
        for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            nbytes = n * k * dtype.itemsize
            count = max(2, -(-rotate // nbytes))
            w = torch.randn(n, k).to(dtype) * 0.02
            ws = [w] + [w.clone() for _ in range(count - 1)]
            for m in args.ms:
                x = torch.randn(m, k).to(dtype)
                calls = {f"{tag} linear_gemv": lambda i, x=x, ws=ws: gemv(x, ws[i % len(ws)], None),
                         f"{tag} F.linear": lambda i, x=x, ws=ws: F.linear(x, ws[i % len(ws)])}
                for t in args.threads:
                    torch.set_num_threads(t)
                    for name, sec in _time(calls, args.seconds, len(ws)).items():
                        out[f"{shape}|{name}|{m}|{t}"] = {"ms": sec * 1e3, "weight_bytes": nbytes}
            del ws, w
    print("RESULT " + json.dumps(out), flush=True)


def worker(args) -> None:
    """One round: every (shape, format, M, threads) once; prints a JSON dict of ms."""
    if args.kind == "dense":
        dense_worker(args)
        return
    import torch

    import llmcore  # noqa: F401  (loads the extension)

    torch.manual_seed(0)
    gemm = torch.ops.llmcore.bfp_gemm
    rotate = 2 * llc_bytes()
    out = {}
    for shape in args.shapes.split(";"):
        n, k = SHAPES[shape]
        for fmt, bits in FORMATS.items():
            cols = k if bits > 4 else (k + 1) // 2
            nbytes = n * cols + n * ((k + 31) // 32)
            count = max(2, -(-rotate // nbytes))
            if bits > 4:
                wm = torch.randint(-127, 128, (n, cols), dtype=torch.int8)
            else:
                wm = torch.randint(0, 256, (n, cols), dtype=torch.uint8)
            we = torch.randint(118, 126, (n, (k + 31) // 32), dtype=torch.uint8)
            ws = [(wm, we)] + [(wm.clone(), we.clone()) for _ in range(count - 1)]
            for m in args.ms:
                am = torch.randint(-127, 128, (m, k), dtype=torch.int8)
                ae = torch.randint(120, 130, (m, (k + 31) // 32), dtype=torch.uint8)

                def call(i, am=am, ae=ae, ws=ws, bits=bits, k=k):
                    wm, we = ws[i % len(ws)]
                    return gemm(am, ae, wm, we, 8, bits, 32, k, None, torch.float32)

                for t in args.threads:
                    torch.set_num_threads(t)
                    call(0)
                    w0 = time.perf_counter()
                    call(1)
                    per = time.perf_counter() - w0
                    calls = max(len(ws), min(400, int(args.seconds / max(per, 1e-6))))
                    samples = []
                    i = 2
                    for _ in range(3):  # median of three batches
                        w0 = time.perf_counter()
                        for _ in range(calls):
                            call(i)
                            i += 1
                        samples.append((time.perf_counter() - w0) / calls)
                    out[f"{shape}|{fmt}|{m}|{t}"] = {"ms": statistics.median(samples) * 1e3,
                                                     "weight_bytes": nbytes}
            del ws
    print("RESULT " + json.dumps(out), flush=True)


def membw(binary: Path, threads: list[int]) -> dict[int, float]:
    r = subprocess.run([str(binary), "512", "7", ",".join(map(str, threads))],
                       capture_output=True, text=True, check=True)
    return {d["threads"]: d["median_GBps"] for d in map(json.loads, r.stdout.split("\n")[:-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ms", default="1,5")
    ap.add_argument("--shapes", default=None, help="';'-separated names of SHAPES")
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=DIR: import llmcore from DIR (default: this checkout)")
    ap.add_argument("--seconds", type=float, default=0.03, help="per timed batch")
    ap.add_argument("--kind", choices=("bfp", "dense"), default="bfp",
                    help="bfp: the int8-activation BFP GEMV; dense: linear_gemv vs F.linear")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.ms = [int(m) for m in args.ms.split(",")]
    if args.worker:
        worker(args)
        return
    shapes = args.shapes.split(";") if args.shapes else list(QUICK if args.quick else SHAPES)
    rounds = args.rounds or (3 if args.quick else 5)
    variants = dict(v.split("=", 1) for v in (args.variant or [f"this={HERE.parent}"]))
    binary = Path("/tmp/llmcore_membw")
    subprocess.run(["g++", "-O3", "-march=native", "-fopenmp", str(HERE / "membw.cpp"), "-o",
                    str(binary)], check=True)
    cmd = [sys.executable, __file__, "--worker", "--shapes", ";".join(shapes),
           "--threads", ",".join(map(str, args.threads)), "--ms", ",".join(map(str, args.ms)),
           "--seconds", str(args.seconds), "--kind", args.kind]
    bw: dict[int, list[float]] = {t: [] for t in args.threads}
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    nbytes: dict[str, int] = {}
    load = os.getloadavg()
    for r in range(rounds):
        for t, g in membw(binary, args.threads).items():
            bw[t].append(g)
        for name, path in variants.items():
            env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp")
            if p.returncode:
                sys.exit(f"worker {name} failed:\n{p.stderr}")
            res = json.loads(p.stdout.split("RESULT ", 1)[1])
            for key, v in res.items():
                samples[name].setdefault(key, []).append(v["ms"])
                nbytes[key] = v["weight_bytes"]
        print(f"round {r + 1}/{rounds} done; membw "
              + ", ".join(f"t={t}: {statistics.median(v):.1f} GB/s" for t, v in bw.items()),
              flush=True)
    roof = {t: statistics.median(v) for t, v in bw.items()}
    rows = []
    for key in nbytes:
        shape, fmt, m, t = key.split("|")
        row = {"shape": shape, "N": SHAPES[shape][0], "K": SHAPES[shape][1], "format": fmt,
               "M": int(m), "threads": int(t), "weight_bytes": nbytes[key]}
        for name in variants:
            ms = statistics.median(samples[name][key])
            row[name] = {"ms": ms, "GBps": nbytes[key] / ms / 1e6,
                         "fraction_of_membw": nbytes[key] / ms / 1e6 / roof[int(t)]}
        rows.append(row)
    names = list(variants)
    print("\nstreaming read (membw.cpp, 512 MiB): "
          + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in roof.items()))
    print(f"{'shape':24s} {'fmt':16s} M  t " + " ".join(f"{n:>16s}" for n in names)
          + "   (GB/s of weights, fraction of membw)")
    for row in rows:
        print(f"{row['shape']:24s} {row['format']:16s} {row['M']:<2d} {row['threads']} "
              + " ".join(f"{row[n]['GBps']:8.1f} ({row[n]['fraction_of_membw']:4.2f})"
                         for n in names))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    res = {"benchmark": "gemv_bandwidth" if args.kind == "bfp" else "gemv_bandwidth_dense",
           "command": "python " + " ".join(sys.argv),
           "commit": commit, "variants": variants,
           "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                        if ln.startswith("model name")), platform.machine()),
           "cpu_count": os.cpu_count(), "llc_bytes": llc_bytes(),
           "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "rounds": rounds,
           "membw_GBps": roof, "membw_samples": bw, "gemv": rows,
           "notes": "Medians over rounds; each round runs every variant in its own process, "
                    "in turn (A, B, A, B). The machine is shared (2 cores): wall-clock "
                    "figures are noisy."}
    import torch

    from llmcore.bench.common import device_slug

    dev = device_slug(torch.device("cpu"))  # cpu-amd-epyc, cpu-intel-xeon, ...
    name = "gemv_bandwidth.json" if args.kind == "bfp" else "gemv_bandwidth_dense.json"
    out = Path(args.out or HERE / "results" / dev / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
