"""The int8-activation decode path on the CPU against the exact weight-only one.

Three measurements, written to one JSON (default
benchmarks/results/<device>/gemv_int8act.json):

* ``gemv``: M = 1 BFP linear on the projection shapes of the 124M preset (Llama-shaped
  110M-class: dim 768, MLP 3072, vocab 32000) and of Llama-3.2-1B (dim 2048, MLP 8192,
  K/V 512), for mxint8 and mxint4 weights: exact weight-only (``act_format=None``) vs
  int8 activations (``act_format="mxint8"``) vs torch fp32 ``F.linear``, at 1 and 2
  threads. Weights rotate over more bytes than the last-level cache; rounds interleave
  the methods (A, B, C, A, B, C, ...) and the medians are reported, as GB/s of weight
  bytes per wall second and per CPU second of the process (the latter is less sensitive
  to other processes on a shared machine).
* ``decode``: tokens/s of a random-weight 124M model (prompt 32, greedy steps of one
  token through the KV cache), ``quantize(fmt, act_format=None)`` vs the default
  ``quantize(fmt)`` (int8 activations), interleaved.
* ``perplexity``: held-out bits per byte of a trained llmcore model (``--model``, skipped
  when absent), fp32 vs each format exact vs int8 activations.

Run from the repository root: PYTHONPATH=. python benchmarks/gemv_int8act.py [--quick]
[--model DIR] [--out FILE] (PYTHONPATH makes sure this checkout's llmcore is the one
imported; the JSON records which one was).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmcore
from llmcore.ops import bfp_linear, bfp_quantize

SHAPES = {  # name: (N, K)
    "124M qkvo 768x768": (768, 768),
    "124M up 3072x768": (3072, 768),
    "124M down 768x3072": (768, 3072),
    "1B q/o 2048x2048": (2048, 2048),
    "1B k/v 512x2048": (512, 2048),
    "1B gate/up 8192x2048": (8192, 2048),
    "1B down 2048x8192": (2048, 8192),
}
ROTATE_BYTES = 256 << 20  # > the 105 MiB L3 of the machine the results were measured on


def timed(fn, calls: int) -> tuple[float, float]:
    """(wall s, process CPU s) per call over ``calls`` calls."""
    w, c = time.perf_counter(), time.process_time()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - w) / calls, (time.process_time() - c) / calls


def gemv(rounds: int, shapes: dict, threads: list[int]) -> list[dict]:
    out = []
    for shape, (n, k) in shapes.items():
        x = torch.randn(1, k)
        methods = {}
        fp32_count = max(2, ROTATE_BYTES // (n * k * 4))
        w32 = [torch.randn(n, k) for _ in range(fp32_count)]
        methods["torch fp32 F.linear"] = (lambda i, w=w32, x=x: F.linear(x, w[i % len(w)]),
                                          n * k * 4)
        for fmt in ("mxint8", "mxint4"):
            q0 = bfp_quantize(w32[0], fmt)
            count = max(2, ROTATE_BYTES // q0.nbytes())
            qs = [q0] + [bfp_quantize(torch.randn(n, k), fmt) for _ in range(count - 1)]
            methods[f"{fmt} exact"] = (lambda i, q=qs, x=x: bfp_linear(x, q[i % len(q)]), q0.nbytes())
            methods[f"{fmt} int8-act"] = (
                lambda i, q=qs, x=x: bfp_linear(x, q[i % len(q)], act_format="mxint8"), q0.nbytes())
        for t in threads:
            torch.set_num_threads(t)
            calls = {}
            for name, (fn, _nbytes) in methods.items():  # warm up, and size a timed batch
                fn(0)
                per = timed(fn, 3)[0]
                calls[name] = max(3, min(200, int(0.05 / max(per, 1e-6))))
            samples = {name: [] for name in methods}
            for _ in range(rounds):
                for name, (fn, _) in methods.items():
                    samples[name].append(timed(fn, calls[name]))
            for name, (_, nbytes) in methods.items():
                wall = statistics.median(s[0] for s in samples[name])
                cpu = statistics.median(s[1] for s in samples[name])
                out.append({"shape": shape, "N": n, "K": k, "threads": t, "method": name,
                            "weight_bytes": nbytes, "ms": wall * 1e3,
                            "GBps": nbytes / wall / 1e9, "cpu_ms": cpu * 1e3,
                            "GB_per_cpu_s": nbytes / max(cpu, 1e-9) / 1e9})
                print(f"{shape:22s} t={t} {name:20s} {wall * 1e3:8.3f} ms "
                      f"{nbytes / wall / 1e9:6.1f} GB/s  ({nbytes / max(cpu, 1e-9) / 1e9:5.1f} "
                      f"GB per CPU s)", flush=True)
    return out


@torch.inference_mode()
def decode(rounds: int, threads: list[int], steps: int, preset: str = "124M") -> list[dict]:
    from llmcore.models import Transformer, TransformerConfig

    cfg = TransformerConfig.from_name(preset, vocab_size=32000)
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    models = {}
    for fmt in ("mxint8", "mxint4"):
        models[f"{fmt} exact"] = base.quantized(fmt, act_format=None).eval()
        models[f"{fmt} int8-act"] = base.quantized(fmt).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 32))
    out = []
    for t in threads:
        torch.set_num_threads(t)
        runs = {}
        for name, m in models.items():
            cache = m.new_cache(1, prompt.shape[1] + steps + 1)
            m(prompt, cache=cache, prefill=True)

            def step_all(m=m, cache=cache):
                cache.rollback(prompt.shape[1])
                tok = prompt[:, -1:]
                for _ in range(steps):
                    tok = m(tok, cache=cache)[:, -1:].argmax(-1)

            step_all()
            runs[name] = step_all
        samples = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                w = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - w) / steps)
        for name in runs:
            s = statistics.median(samples[name])
            out.append({"preset": f"{preset} (vocab 32000)", "threads": t, "method": name,
                        "ms_per_token": s * 1e3, "tok_per_s": 1 / s})
            print(f"decode {preset} t={t} {name:16s} {s * 1e3:7.2f} ms/token {1 / s:6.1f} tok/s",
                  flush=True)
    return out


@torch.inference_mode()
def perplexity(model_dir: str, max_tokens: int, seq_len: int = 256) -> list[dict]:
    from llmcore.data.prepare import ensure_shards
    from llmcore.data.shards import TokenShards
    from llmcore.evaluation import evaluate_split
    from llmcore.models import Transformer

    base = Transformer.from_pretrained(model_dir).eval()
    shards = TokenShards(ensure_shards("stdlib", model_dir, 0.05))
    seq_len = min(seq_len, base.config.max_seq_len)
    out = []
    variants = [("fp32", None, None)] + [(f"{f} {a}", f, act) for f in ("mxint8", "mxint4")
                                         for a, act in (("exact", None), ("int8-act", "auto"))]
    for name, fmt, act in variants:
        m = base if fmt is None else base.quantized(fmt, act_format=act).eval()
        r = evaluate_split(m, shards, "val", seq_len, 8, max_tokens)
        out.append({"model": model_dir, "variant": name, "bpb": r["bpb"], "loss": r["loss"],
                    "tokens": r["tokens"], "seq_len": seq_len})
        print(f"perplexity {name:16s} bpb {r['bpb']:.5f} loss {r['loss']:.5f} "
              f"({r['tokens']} tokens)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer rounds")
    ap.add_argument("--model", default="/tmp/runs/stdlib/final",
                    help="trained llmcore model for the perplexity section (skipped if absent)")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    shapes = ({k: SHAPES[k] for k in ("124M up 3072x768", "1B gate/up 8192x2048")}
              if args.quick else SHAPES)
    rounds = 3 if args.quick else 5
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    load = os.getloadavg()
    res = {"benchmark": "gemv_int8act", "command": "PYTHONPATH=. python benchmarks/gemv_int8act.py"
           + (" --quick" if args.quick else ""), "commit": commit,
           "llmcore": str(Path(llmcore.__file__).parent),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "loadavg_at_start": load,
           "notes": "Measured on a 2-core machine shared with other processes (compiles, "
                    "training): wall-clock figures are noisy; the methods interleave round "
                    "by round and the medians are reported, GB per CPU second beside GB/s."}
    res["gemv"] = gemv(rounds, shapes, threads)
    res["decode"] = decode(rounds, threads, steps=8 if args.quick else 16)
    if args.model and Path(args.model, "config.json").exists():
        res["perplexity"] = perplexity(args.model, args.ppl_tokens)
    res["loadavg_at_end"] = os.getloadavg()
    from llmcore.bench.common import device_slug

    dev = device_slug(torch.device("cpu"))  # cpu-amd-epyc, cpu-intel-xeon, ...
    out = Path(args.out or Path(__file__).parent / "results" / dev / "gemv_int8act.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
