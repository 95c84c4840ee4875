"""``llmcore data``: token shards from a corpus, and instruction / preference sets made
from the standard library's functions."""

from __future__ import annotations

import time

from llmcore.cli._common import float_in, int_at_least


def add_parser(subparsers):
    p = subparsers.add_parser("data", help="prepare training data (token shards, "
                              "instruction and preference sets)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("prepare", help="tokenise text/JSONL/Parquet or stdlib into shards")
    t.add_argument("--data", nargs="+", default=["stdlib"], metavar="stdlib|PATH")
    t.add_argument("--tokenizer", required=True, help="tokenizer directory")
    t.add_argument("--val-fraction", type=float_in(0.0, 1.0, hi_open=True), default=0.05)
    t.add_argument("--out", required=True, help="shard directory")
    for name, what in (("sft-stdlib", "instruction set: docstring and signature -> body"),
                       ("preferences-stdlib", "preference set: real function vs a "
                        "corrupted copy, labelled by corruption type")):
        s = sub.add_parser(name, help=f"{what}, from the stdlib's functions (JSONL)")
        s.add_argument("--out", required=True,
                       help="folder for train.jsonl, val.jsonl and stats.json")
        s.add_argument("--val-fraction", type=float_in(0.0, 1.0, hi_open=True), default=0.05,
                       help="share of source files held out (the pretraining split)")
        s.add_argument("--max-chars", type=int_at_least(1), default=1500,
                       help="skip functions whose body is longer (characters)")
    s = sub.add_parser("mc-stdlib", help="multiple-choice set: which of four lines comes next, "
                       "from held-out stdlib files (JSONL, for `llmcore eval multiple-choice`)")
    s.add_argument("--out", required=True, help="folder for test.jsonl, dev.jsonl, stats.json")
    s.add_argument("--val-fraction", type=float_in(0.0, 1.0, lo_open=True, hi_open=True),
                   default=0.05, help="share of source files held out (the pretraining split)")
    s.add_argument("--context-lines", type=int_at_least(1), default=12)
    s.add_argument("--per-file", type=int_at_least(1), default=8, help="items per file at most")
    return p


def _print_counts(stats: dict, seconds: float) -> None:
    splits = list(stats["splits"])
    rows = [("rows", [stats["splits"][s]["rows"] for s in splits]),
            ("files with rows", [stats["splits"][s]["files"] for s in splits])]
    for kind in stats.get("corruptions", {}).get(splits[0], {}):
        rows.append((f"  {kind}", [stats["corruptions"][s][kind] for s in splits]))
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}" + "".join(f"{s:>10}" for s in splits))
    for label, values in rows:
        print(f"{label:{width}}" + "".join(f"{v:>10,}" for v in values))
    f = stats["files"]
    skipped = ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].items()) or "none"
    print(f"files read {f['read']:,} ({f['unparsable']:,} do not parse), functions "
          f"{stats['functions']:,}; skipped: {skipped}; {seconds:.1f} s")


def run(args) -> int:
    if args.action == "prepare":
        from llmcore.data.shards import prepare_shards

        data = "stdlib" if args.data == ["stdlib"] else args.data
        h = prepare_shards(data, args.tokenizer, args.out, args.val_fraction)
        for split, s in h["splits"].items():
            print(f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents, "
                  f"{s['bytes']:,} bytes")
        print(f"wrote {args.out} ({h['dtype']})")
        return 0
    if args.action == "mc-stdlib":
        from llmcore.evaluation.multiple_choice import write_stdlib_mc

        st = write_stdlib_mc(args.out, args.val_fraction, args.context_lines, args.per_file)
        print(f"test {st['test']:,} items ({st['subjects']} subjects), dev {st['dev']} items; "
              f"wrote {args.out}/test.jsonl, dev.jsonl, stats.json (template: plain)")
        return 0
    from llmcore.data.stdlib_tasks import write_preferences_stdlib, write_sft_stdlib

    write = write_sft_stdlib if args.action == "sft-stdlib" else write_preferences_stdlib
    t0 = time.perf_counter()
    stats = write(args.out, val_fraction=args.val_fraction, max_chars=args.max_chars)
    _print_counts(stats, time.perf_counter() - t0)
    print(f"wrote {args.out}/train.jsonl, val.jsonl, stats.json")
    return 0
