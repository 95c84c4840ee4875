"""Held-out bits per byte of a trained model quantised with and without the compact
(BFP) embedding table, and the bytes the table costs either way.

``Transformer.quantize()`` stores the input embedding in the head's format by default
(``embedding="auto"``: one BFP matrix for a tied head and embedding); ``embedding=None``
keeps the full-precision table. This measures what that costs in accuracy.

    python benchmarks/compact_embedding.py --model runs/stdlib/final \\
        --out benchmarks/results/cpu-intel-xeon/compact_embedding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch


def table_bytes(model) -> int:
    """Bytes of the embedding table and the head, each storage counted once."""
    seen, total = set(), 0
    for mod in (model.embed_tokens, model.lm_head):
        for t in [*mod.parameters(), *mod.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def main() -> None:
    from llmcore.data.prepare import ensure_shards
    from llmcore.data.shards import TokenShards
    from llmcore.evaluation import evaluate_split
    from llmcore.models import Transformer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained llmcore model directory")
    ap.add_argument("--tokens", type=int, default=32768, help="held-out tokens to score")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = Transformer.from_pretrained(args.model).eval()
    shards = TokenShards(ensure_shards("stdlib", args.model, 0.05))
    seq_len = min(256, base.config.max_seq_len)
    rows = []
    for fmt, emb in [(None, None), ("mxint8", None), ("mxint8", "auto"), ("mxint4", None),
                     ("mxint4", "auto")]:
        if fmt is None:
            m = base
        else:
            m = Transformer.from_pretrained(args.model).eval().quantize(fmt, embedding=emb)
        r = evaluate_split(m, shards, "val", seq_len, 8, args.tokens)
        rows.append({"format": fmt or "fp32", "embedding": "full" if emb is None else "bfp",
                     "bpb": r["bpb"], "loss": r["loss"], "tokens": r["tokens"],
                     "embedding_and_head_bytes": table_bytes(m)})
        print(f"{rows[-1]['format']:7s} embedding {rows[-1]['embedding']:4s} bpb {r['bpb']:.5f} "
              f"table+head {table_bytes(m) / 2**20:7.2f} MiB", flush=True)
    res = {"benchmark": "compact_embedding", "model": args.model, "seq_len": seq_len,
           "cpu": platform.processor() or platform.machine(),
           "command": "python benchmarks/compact_embedding.py --model " + args.model,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "results": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
