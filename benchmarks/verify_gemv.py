"""The projections of a verification call against a decode step's: each projection of the
110M shape (12 layers, dim 768, ffn 3072, vocab 32000, random weights in a BFP format, the
tile layout ``quantize()`` chooses) over its 12 layers, with 1 activation row (a decode
step) and with ``--tokens`` rows (a verification of tokens - 1 drafts), each pass after a
read of 64 MB so that its weights come from DRAM, as they do in a step (the 12 layers'
weights and the head do not fit the last-level cache; a read, not a write, so that no
dirty lines are written back during the timed pass).

    python benchmarks/verify_gemv.py [--threads 1 2] [--format mxint4] [--tokens 5] \
        [--rounds 7] [--out X.json]

Per projection: ms of the 12 layers' calls (the head: one call) with 1 row and with
``tokens`` rows, alternated (1, T, 1, T, ...), medians over the rounds, their ratio and the
difference: what the verify call's GEMVs add to a step's. The calls are those of the
fused inference path (``bfp_linears_shared_input`` for q/k/v and gate/up, ``dense`` for
o_proj, down and the head).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmcore.models import Transformer, TransformerConfig
from llmcore.models.transformer import bfp_linears_shared_input, dense

PARTS = ("qkv", "o_proj", "gate_up", "down", "head")


def build(fmt: str) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072,
                            vocab_size=32000, max_seq_len=512)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.quantize(fmt)
    return model


def run_part(model: Transformer, part: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if part == "head":
        dense(model.lm_head, x)
        return
    for b in model.layers:
        a, m = b.self_attn, b.mlp
        if part == "qkv":
            out = bfp_linears_shared_input(x, (a.q_proj, a.k_proj, a.v_proj))
            if out is None:
                raise RuntimeError("q/k/v do not share one quantised input in this format")
        elif part == "o_proj":
            dense(a.o_proj, x)
        elif part == "gate_up":
            out = bfp_linears_shared_input(x, (m.gate_proj, m.up_proj))
            if out is None:
                raise RuntimeError("gate/up do not share one quantised input in this format")
        else:
            dense(m.down_proj, y)


@torch.inference_mode()
def measure(model: Transformer, threads: int, tokens: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    xs = {t: torch.randn(1, t, 768, generator=g) for t in (1, tokens)}
    ys = {t: torch.randn(1, t, 3072, generator=g) for t in (1, tokens)}
    evict = torch.ones(64 << 20, dtype=torch.uint8)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for part in PARTS:
            for t in (1, tokens):
                evict.max()  # the weights leave the caches, as between a step's layers
                t0 = time.perf_counter()
                run_part(model, part, xs[t], ys[t])
                times.setdefault((part, t), []).append((time.perf_counter() - t0) * 1e3)
    out = {}
    for part in PARTS:
        one, many = (statistics.median(times[(part, t)]) for t in (1, tokens))
        out[part] = {"ms_1": one, f"ms_{tokens}": many, "ratio": many / one,
                     "extra_ms": many - one}
    one = sum(v["ms_1"] for v in out.values())
    many = sum(v[f"ms_{tokens}"] for v in out.values())
    out["all"] = {"ms_1": one, f"ms_{tokens}": many, "ratio": many / one, "extra_ms": many - one}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--format", default="mxint4")
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tokens < 2 or args.rounds < 1:
        ap.error("--tokens must be >= 2 and --rounds >= 1")
    model = build(args.format)
    res = {"format": args.format, "tokens": args.tokens, "rounds": args.rounds,
           "commit": _commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "cpu": _cpu(), "torch": torch.__version__, "threads": {}}
    for t in args.threads:
        r = res["threads"][t] = measure(model, t, args.tokens, args.rounds)
        print(f"threads {t}: part, ms with 1 row, with {args.tokens}, ratio, extra ms")
        for part, v in r.items():
            print(f"  {part:8s} {v['ms_1']:7.3f} {v[f'ms_{args.tokens}']:7.3f} "
                  f"{v['ratio']:5.2f} {v['extra_ms']:+7.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def _cpu() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        return None


def _commit() -> str | None:
    import subprocess
    from pathlib import Path
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
