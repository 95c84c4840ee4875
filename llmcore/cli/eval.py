"""``llmcore eval perplexity``: held-out loss, perplexity and bits per byte of a model,
next to what ``xz -9e`` achieves on the same documents."""

from __future__ import annotations

import json

from llmcore.cli._common import add_device_arg, device_from_args, float_in, int_at_least


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, bits per byte)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("perplexity", help="loss / perplexity / bits per byte on held-out data")
    t.add_argument("--model", required=True, help="model directory (with tokenizer.json)")
    t.add_argument("--data", nargs="+", default=["stdlib"], metavar="stdlib|PATH")
    t.add_argument("--split", choices=["val", "train"], default="val")
    t.add_argument("--val-fraction", type=float_in(0.0, 1.0, hi_open=True), default=0.05)
    t.add_argument("--seq-len", type=int_at_least(2), default=256)
    t.add_argument("--batch-size", type=int_at_least(1), default=8)
    t.add_argument("--max-tokens", type=int_at_least(1), help="stop after this many predicted tokens")
    t.add_argument("--no-xz", action="store_true", help="skip the xz -9e baseline")
    t.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    add_device_arg(t)
    return p


def run(args) -> int:
    from llmcore.data.corpus import iter_documents
    from llmcore.data.prepare import ensure_shards
    from llmcore.data.shards import TokenShards
    from llmcore.evaluation import evaluate_split, xz_bits_per_byte
    from llmcore.models import Transformer

    data = "stdlib" if args.data == ["stdlib"] else args.data
    device = device_from_args(args)
    model = Transformer.from_pretrained(args.model, device=device)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    shards = TokenShards(ensure_shards(data, args.model, args.val_fraction))
    r = evaluate_split(model, shards, args.split, seq_len, args.batch_size, args.max_tokens,
                       progress=True)
    out = {"model": args.model, "data": data, "split": args.split, "seq_len": seq_len,
           **{k: r[k] for k in ("loss", "ppl", "bpb", "tokens")}}
    print(f"{args.split}: loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}, "
          f"bits/byte {r['bpb']:.4f} over {r['tokens']:,} tokens")
    if not args.no_xz and not args.max_tokens:
        xz = xz_bits_per_byte(d.text for d in iter_documents(data, args.split,
                                                               args.val_fraction))
        out["xz_bpb"] = xz["bpb"]
        print(f"xz -9e on the same {xz['documents']} documents: {xz['bpb']:.4f} bits/byte")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0
