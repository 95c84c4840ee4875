"""``llmcore tokenizer train``: a byte-level BPE tokenizer from a corpus."""

from __future__ import annotations

from llmcore.cli._common import float_in, int_at_least


def add_parser(subparsers):
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train on the train split of a corpus")
    t.add_argument("--data", nargs="+", default=["stdlib"], metavar="stdlib|PATH")
    t.add_argument("--vocab-size", type=int_at_least(1), default=8192)
    t.add_argument("--val-fraction", type=float_in(0.0, 1.0, hi_open=True), default=0.05,
                   help="held-out share of files, not used for training (default 0.05)")
    t.add_argument("--out", required=True, help="directory for tokenizer.json")
    return p


def run(args) -> int:
    from llmcore.data.corpus import iter_documents, manifest
    from llmcore.tokenizer import train_tokenizer

    data = "stdlib" if args.data == ["stdlib"] else args.data
    n = sum(1 for r in manifest(data, args.val_fraction)["files"] if r["split"] == "train")
    texts = (d.text for d in iter_documents(data, "train", args.val_fraction))
    out = train_tokenizer(texts, args.vocab_size, args.out, length=n)
    print(f"wrote {out}/tokenizer.json (vocab {args.vocab_size})")
    return 0
