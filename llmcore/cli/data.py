"""``llmcore data prepare``: tokenise a corpus into memory-mapped token shards."""

from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("data", help="prepare training data (token shards)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("prepare", help="tokenise text/JSONL/Parquet or stdlib into shards")
    t.add_argument("--data", nargs="+", default=["stdlib"], metavar="stdlib|PATH")
    t.add_argument("--tokenizer", required=True, help="tokenizer directory")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--out", required=True, help="shard directory")
    return p


def run(args) -> int:
    from llmcore.data.shards import prepare_shards

    data = "stdlib" if args.data == ["stdlib"] else args.data
    h = prepare_shards(data, args.tokenizer, args.out, args.val_fraction)
    for split, s in h["splits"].items():
        print(f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents, "
              f"{s['bytes']:,} bytes")
    print(f"wrote {args.out} ({h['dtype']})")
    return 0
