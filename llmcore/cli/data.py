"""``llmcore data``: token shards from a corpus, instruction / preference sets made from
the standard library's functions, the cleaning pipeline and its quality classifier, and
a model's greedy continuations (distillation data for an assisted-generation draft)."""

from __future__ import annotations

import time

from llmcore.cli._common import CLIError, float_in, int_at_least

CLEAN_STEPS = ("extract", "heuristics", "quality", "exact_dedup", "near_dedup", "pii")


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
    f = sub.add_parser("filter", help="keep the SFT rows a judge scores at or above a "
                       "threshold (AlpaGasus)")
    f.add_argument("--data", required=True, help="a JSONL file, or a folder with train.jsonl "
                   "(its val.jsonl is copied unfiltered)")
    f.add_argument("--judge", required=True, metavar="code|rm:DIR|llm:DIR",
                   help="code: parse + doctests; rm:DIR a reward model; llm:DIR a language "
                   "model grading 0-5 (AlpaGasus prompt, grade from token probabilities)")
    cut = f.add_mutually_exclusive_group(required=True)
    cut.add_argument("--threshold", type=float, help="keep rows scoring >= this")
    cut.add_argument("--keep-fraction", type=float_in(0.0, 1.0, lo_open=True),
                     help="keep this share of the rows, the best scored")
    f.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, filter.json")
    f.add_argument("--skip-bad-rows", action="store_true")
    _add_clean_parsers(sub)
    _add_distill_parser(sub)
    return p


def _add_distill_parser(sub) -> None:
    d = sub.add_parser("distill", help="a model's greedy continuations of training-text "
                       "prompts, as token shards (to train an assisted-generation draft on)")
    d.add_argument("--model", required=True, help="the target model directory (RUN/final)")
    d.add_argument("--data", nargs="+", metavar="stdlib|PATH",
                   help="where the prompts come from (its train split; default: the "
                   "target run's data, else stdlib)")
    d.add_argument("--out", required=True, help="shard directory")
    d.add_argument("--prompts", type=int_at_least(1), default=2048,
                   help="continuations written (train + val)")
    d.add_argument("--prompt-tokens", type=int_at_least(1), default=64)
    d.add_argument("--new-tokens", type=int_at_least(1), default=96,
                   help="greedy tokens per prompt")
    d.add_argument("--batch-size", type=int_at_least(1), default=32)
    d.add_argument("--val-prompts", type=int_at_least(0),
                   help="of --prompts, how many (from other documents) form the val split "
                   "(default: 1 in 20)")
    d.add_argument("--val-fraction", type=float_in(0.0, 1.0, hi_open=True),
                   help="share of --data held out and never read (default: the target "
                   "run's; a smaller one is an error)")
    d.add_argument("--quantize", choices=["mxint8", "mxint4"],
                   help="generate with BFP weights (default: the saved dtype)")
    d.add_argument("--seed", type=int, default=0, help="the prompt draw")


def _run_distill(args) -> int:
    from llmcore.training.distill import write_distill_shards

    data = None if args.data is None else "stdlib" if args.data == ["stdlib"] else args.data
    try:
        h = write_distill_shards(args.model, args.out, data, args.prompts, args.prompt_tokens,
                                 args.new_tokens, args.batch_size, args.val_prompts,
                                 args.val_fraction, args.quantize, args.seed)
    except ValueError as e:
        raise CLIError(_flag_names(str(e))) from None
    d = h["distill"]
    for split, s in h["splits"].items():
        print(f"{split}: {s['documents']:,} prompts, {s['tokens']:,} tokens, "
              f"{s['bytes']:,} bytes")
    print(f"{d['seconds']:.1f} s; wrote {args.out} (train with --set shards='\"{args.out}\"' "
          f"--set tokenizer='\"{args.model}\"')")
    return 0


def _flag_names(msg: str) -> str:
    """The library's argument names as the command's flags."""
    import re

    return re.sub(r"(?<![\w-])(prompt_tokens|new_tokens|batch_size|val_prompts|val_fraction|"
                  r"prompts|quantize)\b", lambda m: "--" + m.group(1).replace("_", "-"), msg)


def _add_clean_parsers(sub) -> None:
    c = sub.add_parser("clean", help="extract, filter, deduplicate and redact documents "
                       "(JSONL out, with a report of what each step removed)")
    c.add_argument("--data", nargs="+", default=["stdlib"], metavar="stdlib|PATH",
                   help="stdlib, or text/JSONL/Parquet/HTML files and folders")
    c.add_argument("--out", required=True, help="folder for clean.jsonl and report.json")
    c.add_argument("--steps", default="extract,heuristics,exact_dedup,near_dedup,pii",
                   help=f"comma-separated, in order, from {','.join(CLEAN_STEPS)} "
                   "(quality needs --quality-model)")
    c.add_argument("--html-backend", choices=["resiliparse", "trafilatura", "html.parser"],
                   help="default: the first of these that is installed")
    c.add_argument("--near-threshold", type=float_in(0.0, 1.0, True, True), default=0.8,
                   help="Jaccard similarity of word shingles above which a document is a "
                   "near duplicate")
    c.add_argument("--num-perm", type=int_at_least(1), default=128,
                   help="MinHash permutations")
    c.add_argument("--shingle", type=int_at_least(1), default=5, help="words per shingle")
    c.add_argument("--bands", type=int_at_least(1),
                   help="LSH bands (with --rows; default: optimal for the threshold)")
    c.add_argument("--rows", type=int_at_least(1), help="LSH rows per band")
    c.add_argument("--quality-model", help="a model from `llmcore data quality-train`")
    c.add_argument("--quality-threshold", type=float_in(0.0, 1.0), default=0.5,
                   help="keep documents the classifier scores at least this")
    c.add_argument("--workers", type=int_at_least(1), default=1,
                   help="processes for the steps before the first dedup step")
    q = sub.add_parser("quality-train", help="train the hashed n-gram quality classifier "
                       "(default: the stdlib demo split)")
    q.add_argument("--positive", nargs="+", metavar="PATH", help="good documents")
    q.add_argument("--negative", nargs="+", metavar="PATH", help="bad documents")
    q.add_argument("--out", required=True, help="model file (.npz)")
    q.add_argument("--val-fraction", type=float_in(0.0, 1.0, True, True), default=0.2,
                   help="share held out (by a hash of each document's source)")
    q.add_argument("--epochs", type=int_at_least(1), default=20)
    q.add_argument("--dim", type=int_at_least(2), default=1 << 18,
                   help="hashed feature buckets")
    q.add_argument("--ngrams", type=int_at_least(1), default=2, help="longest token n-gram")


def _run_clean(args) -> int:
    from llmcore.data.clean import build_steps, clean_corpus, format_report
    from llmcore.data.quality import QualityClassifier

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if (args.bands is None) != (args.rows is None):
        raise CLIError("give --bands and --rows together (or neither)")
    if args.quality_model and "quality" not in steps:
        steps.insert(steps.index("heuristics") + 1 if "heuristics" in steps else 0, "quality")
    model = QualityClassifier.load(args.quality_model) if args.quality_model else None
    near = {"threshold": args.near_threshold, "num_perm": args.num_perm,
            "shingle": args.shingle, "bands": args.bands, "rows": args.rows}
    kw = {"html": args.html_backend, "near": near, "quality_model": model,
          "quality_threshold": args.quality_threshold}
    build_steps(steps, **kw)  # a bad step list fails before any file is read
    data = "stdlib" if args.data == ["stdlib"] else args.data
    report = clean_corpus(data, args.out, steps, workers=args.workers, **kw)
    print(format_report(report))
    print(f"wrote {args.out}/clean.jsonl, report.json")
    return 0


def _run_quality_train(args) -> int:
    from llmcore.data.corpus import iter_documents
    from llmcore.data.quality import train_split, train_stdlib

    if (args.positive is None) != (args.negative is None):
        raise CLIError("give --positive and --negative together (or neither, for the "
                       "stdlib demo)")
    fit = {"epochs": args.epochs, "dim": args.dim, "ngrams": args.ngrams}
    t0 = time.perf_counter()
    if args.positive is None:
        model, stats = train_stdlib(args.val_fraction, **fit)
    else:
        pos, neg = list(iter_documents(args.positive)), list(iter_documents(args.negative))
        model, stats = train_split([d.text for d in pos], [d.text for d in neg],
                                   [d.source for d in pos], [d.source for d in neg],
                                   args.val_fraction, **fit)
    model.save(args.out)
    tr, va = stats["train"], stats["val"]
    print(f"train: {tr['positive']:,} positive, {tr['negative']:,} negative; accuracy "
          f"{stats['train_accuracy']:.3f}")
    acc = "n/a (nothing held out)" if stats["val_accuracy"] is None else \
        f"{stats['val_accuracy']:.3f}"
    print(f"held out: {va['positive']:,} positive, {va['negative']:,} negative; accuracy "
          f"{acc}; {time.perf_counter() - t0:.1f} s")
    print(f"wrote {args.out}")
    return 0


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
    if args.action == "clean":
        return _run_clean(args)
    if args.action == "quality-train":
        return _run_quality_train(args)
    if args.action == "distill":
        return _run_distill(args)
    if args.action == "filter":
        from llmcore.evaluation.filtering import write_filtered
        from llmcore.evaluation.judges import make_judge

        r = write_filtered(args.data, args.out, make_judge(args.judge), args.threshold,
                           args.skip_bad_rows, keep_fraction=args.keep_fraction)
        print(f"kept {r['kept']:,} of {r['rows']:,} rows (removed {r['removed']:,}) at "
              f"threshold {r['threshold']:.4g} ({r['judge']} judge, mean score "
              f"{r['mean_score']:.3f})")
        h = r["histogram"]
        for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"], strict=False):
            print(f"  [{lo:8.3f}, {hi:8.3f})  {c:6,}  {'#' * round(40 * c / max(h['counts']))}")
        print(f"wrote {args.out}/train.jsonl, scores.jsonl, filter.json")
        return 0
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
