"""``llmcore eval``: perplexity (held-out loss, perplexity and bits per byte, next to what
``xz -9e`` achieves on the same documents), multiple-choice accuracy, the pairwise win rate
of two models, and the n-gram contamination check of an evaluation set."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmcore.cli._common import (
    CLIError,
    add_device_arg,
    device_from_args,
    float_in,
    int_at_least,
)


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, multiple choice, "
                              "win rate) or an evaluation set (contamination)")
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

    m = sub.add_parser("multiple-choice", help="accuracy by the log-likelihood of each choice")
    m.add_argument("--model", required=True, help="model directory (with tokenizer.json)")
    m.add_argument("--data", default="stdlib", metavar="stdlib|FILE.jsonl",
                   help="items (question, choices, answer[, subject]); stdlib: the next-line "
                   "set built from held-out stdlib files (cached)")
    m.add_argument("--dev", metavar="FILE.jsonl", help="few-shot examples (default for "
                   "stdlib: its dev set)")
    m.add_argument("--shots", type=int_at_least(0), default=0)
    m.add_argument("--template", choices=["cloze", "letters", "plain"],
                   help="prompt format (default: plain for stdlib, cloze otherwise)")
    m.add_argument("--limit", type=int_at_least(1), help="the first N items only")
    m.add_argument("--val-fraction", type=float_in(0.0, 1.0, lo_open=True, hi_open=True),
                   default=0.05, help="the held-out share of files (stdlib)")
    m.add_argument("--max-tokens", type=int_at_least(16), default=4096,
                   help="tokens per packed forward pass")
    m.add_argument("--exclude-contaminated", nargs="+", metavar="stdlib|PATH",
                   help="drop the items sharing an --ngram-word sequence (question + right "
                        "answer) with these training documents (their train split) first")
    m.add_argument("--ngram", type=int_at_least(1), default=13,
                   help="n-gram length in words for --exclude-contaminated")
    m.add_argument("--json", metavar="FILE", help="also write the figures (and every item's "
                   "log-likelihoods) as JSON")
    add_device_arg(m)

    w = sub.add_parser("win-rate", help="pairwise win rate of A over B, both orders")
    w.add_argument("--a", required=True, metavar="MODEL_DIR|ANSWERS.jsonl")
    w.add_argument("--b", required=True, metavar="MODEL_DIR|ANSWERS.jsonl")
    w.add_argument("--prompts", metavar="FILE", help="JSONL (prompt/instruction field) or one "
                   "prompt per line; default: the prompts of --a's answers file")
    w.add_argument("--judge", required=True, metavar="llm:MODEL_DIR|rm:MODEL_DIR|code",
                   help="llm: a language model asked which answer is better (A/B log-probs); "
                        "rm: a reward model's scores compared; code: parse + doctest checks "
                        "compared (ties count half)")
    w.add_argument("--margin", type=float, default=0.0,
                   help="rm/code judges: score differences within this count as a tie")
    w.add_argument("--limit", type=int_at_least(1), help="the first N prompts only")
    w.add_argument("--max-new-tokens", type=int_at_least(1), default=256)
    w.add_argument("--batch-size", type=int_at_least(1), default=8)
    w.add_argument("--no-swap", action="store_true", help="judge A first only (biased)")
    w.add_argument("--resamples", type=int_at_least(0), default=2000, help="bootstrap draws")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--answers-out", metavar="DIR", help="write generated answers as JSONL")
    w.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    add_device_arg(w)

    c = sub.add_parser("contamination", help="n-gram overlap of an evaluation set with "
                       "training data")
    c.add_argument("--eval", required=True, nargs="+", metavar="FILE",
                   help="evaluation files (JSONL rows, or any text file as one item)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", nargs="+", metavar="stdlib|PATH", help="training documents")
    src.add_argument("--shards", metavar="DIR", help="token shards (needs --tokenizer)")
    c.add_argument("--split", choices=["train", "val", "all"], default="train",
                   help="the part of the training data to check against")
    c.add_argument("--val-fraction", type=float_in(0.0, 1.0, hi_open=True), default=0.05)
    c.add_argument("--tokenizer", metavar="DIR", help="count n-grams of tokens (default for "
                   "--train: words)")
    c.add_argument("--n", type=int_at_least(1), default=13, help="n-gram length")
    c.add_argument("--min-fraction", type=float_in(0.0, 1.0), default=0.0,
                   help="share of an item's n-grams that must match (0: any one)")
    c.add_argument("--show", type=int_at_least(0), default=10, help="list this many "
                   "contaminated items")
    c.add_argument("--json", metavar="FILE", help="also write the report (every item) as JSON")
    return p


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def run(args) -> int:
    if args.action == "multiple-choice":
        return _multiple_choice(args)
    if args.action == "win-rate":
        return _win_rate(args)
    if args.action == "contamination":
        return _contamination(args)
    return _perplexity(args)


def stdlib_mc_dir(val_fraction: float) -> Path:
    """The cached stdlib multiple-choice set (built on first use)."""
    from llmcore.data.prepare import cache_dir
    from llmcore.evaluation.multiple_choice import write_stdlib_mc

    out = cache_dir() / "mc-stdlib" / f"val{val_fraction:g}"
    if not (out / "stats.json").is_file():
        print(f"building the stdlib multiple-choice set in {out} ...")
        write_stdlib_mc(out, val_fraction)
    return out


def _multiple_choice(args) -> int:
    from llmcore.evaluation.multiple_choice import evaluate_multiple_choice, read_items
    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer

    if args.data == "stdlib":
        d = stdlib_mc_dir(args.val_fraction)
        data, dev = d / "test.jsonl", args.dev or d / "dev.jsonl"
        template = args.template or "plain"
    else:
        data, dev, template = args.data, args.dev, args.template or "cloze"
    if args.shots and not dev:
        raise CLIError(f"--shots {args.shots} needs --dev FILE.jsonl")
    items = read_items(data)[:args.limit]
    dev_items = read_items(dev) if dev and args.shots else []
    excluded = []
    if args.exclude_contaminated:
        items, excluded = _decontaminate(items, args)
        if not items:
            raise CLIError("--exclude-contaminated removed every item")
    model = Transformer.from_pretrained(args.model, device=device_from_args(args)).eval()
    tok = load_tokenizer(args.model)
    r = evaluate_multiple_choice(model, tok, items, dev_items, args.shots, template,
                                 args.max_tokens)
    print(r.table())
    print(f"acc {r.acc:.4f} ± {r.acc_stderr:.4f}, acc_norm {r.acc_norm:.4f} ± "
          f"{r.acc_norm_stderr:.4f} over {r.n} items ({args.shots}-shot, {template}; chance "
          f"{sum(1 / len(i.choices) for i in items) / len(items):.3f})")
    if args.json:
        _write_json(args.json, {"model": args.model, "data": str(data), "shots": args.shots,
                                "template": template, "excluded_contaminated": excluded,
                                **r.to_dict(rows=True)})
    return 0


def _decontaminate(items, args):
    """``items`` less those sharing an ``args.ngram``-word sequence (question plus right
    answer) with the train split of ``args.exclude_contaminated``; and the removed ones'
    sources."""
    from llmcore.data.corpus import iter_documents
    from llmcore.evaluation.contamination import check_contamination

    spec = args.exclude_contaminated
    data = "stdlib" if spec == ["stdlib"] else spec
    texts = [(str(i), f"{it.question}\n{it.choices[it.answer]}") for i, it in enumerate(items)]
    train = (d.text for d in iter_documents(data, "train", args.val_fraction))
    r = check_contamination(texts, train, args.ngram)
    bad = {int(row["id"]) for row in r["rows"] if row["contaminated"]}
    print(f"--exclude-contaminated: dropped {len(bad)} of {len(items)} items sharing a "
          f"{args.ngram}-word sequence with {' '.join(spec)} (train split)")
    return ([it for i, it in enumerate(items) if i not in bad],
            [items[i].source or str(i) for i in sorted(bad)])


def _answers(spec: str, prompts, args, name: str) -> list[str]:
    """Answers of side ``name``: looked up in a JSONL file, or generated by a model."""
    from llmcore.evaluation.win_rate import generate_answers, read_answers

    if os.path.isfile(spec):
        table = read_answers(spec)
        missing = [p for p in prompts if p not in table]
        if missing:
            raise CLIError(f"--{name} {spec}: no answer for {len(missing)} of the prompts "
                           f"(first: {missing[0][:60]!r})")
        return [table[p] for p in prompts]
    if not os.path.isdir(spec):
        raise CLIError(f"--{name} {spec}: neither an answers file nor a model directory")
    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer

    model = Transformer.from_pretrained(spec, device=device_from_args(args)).eval()
    out = generate_answers(model, load_tokenizer(spec), prompts, args.max_new_tokens,
                           args.batch_size)
    if args.answers_out:
        os.makedirs(args.answers_out, exist_ok=True)
        with open(os.path.join(args.answers_out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for p, a in zip(prompts, out, strict=True):
                f.write(json.dumps({"prompt": p, "response": a}, ensure_ascii=False) + "\n")
    return out


def _win_rate(args) -> int:
    from llmcore.evaluation.win_rate import (
        LogprobPairwiseJudge,
        format_table,
        read_answers,
        read_prompts,
        win_rate,
    )

    kind, _, path = args.judge.partition(":")
    if not ((kind in ("llm", "rm") and path) or (kind == "code" and not path)):
        raise CLIError(f"--judge must be llm:MODEL_DIR, rm:MODEL_DIR or code, got {args.judge!r}")
    if kind in ("llm", "rm") and not os.path.isdir(path):
        raise CLIError(f"--judge {args.judge}: {path} is not a directory")
    if not args.margin >= 0:
        raise CLIError(f"--margin must be >= 0, got {args.margin}")
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif os.path.isfile(args.a):
        prompts = list(read_answers(args.a))
    else:
        raise CLIError("--prompts FILE is needed when --a is a model")
    prompts = prompts[:args.limit]
    a = _answers(args.a, prompts, args, "a")
    b = _answers(args.b, prompts, args, "b")
    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer

    if kind == "llm":
        judge_model = Transformer.from_pretrained(path, device=device_from_args(args)).eval()
        judge = LogprobPairwiseJudge(judge_model, load_tokenizer(path))
    else:
        from llmcore.evaluation.judges import make_judge
        from llmcore.evaluation.win_rate import PointwisePairwise

        judge = PointwisePairwise(make_judge(args.judge, device=device_from_args(args)),
                                  margin=args.margin)
    r = win_rate(prompts, a, b, judge, swap=not args.no_swap, resamples=args.resamples,
                 seed=args.seed)
    print(format_table(r, args.a, args.b))
    if args.json:
        _write_json(args.json, {"a": args.a, "b": args.b, "judge": args.judge, **r})
    return 0


def _contamination(args) -> int:
    from llmcore.evaluation.contamination import check_contamination, read_eval_items, shard_stream

    items = read_eval_items(args.eval)
    encode = None
    if args.tokenizer:
        from llmcore.tokenizer import load_tokenizer, tokenizer_hash

        tok = load_tokenizer(args.tokenizer)

        def encode(text):
            return tok.encode(text, add_special_tokens=False)
    splits = ["train", "val"] if args.split == "all" else [args.split]
    if args.shards:
        from llmcore.data.shards import TokenShards

        if encode is None:
            raise CLIError("--shards needs --tokenizer (the tokenizer that made the shards)")
        shards = TokenShards(args.shards)
        if shards.header.get("tokenizer_sha256") != tokenizer_hash(args.tokenizer):
            raise CLIError(f"--tokenizer {args.tokenizer} is not the tokenizer that made "
                           f"{args.shards}")
        train = shard_stream(shards, splits, args.n)
        what = f"{args.shards} ({'+'.join(splits)})"
    else:
        from llmcore.data.corpus import iter_documents

        data = "stdlib" if args.train == ["stdlib"] else args.train
        split = None if args.split == "all" else args.split
        train = (d.text for d in iter_documents(data, split, args.val_fraction))
        what = f"{' '.join(args.train)} ({args.split})"
    r = check_contamination(items, train, args.n, encode, args.min_fraction)
    print(f"{r['contaminated']} of {r['checked']} items ({100 * r['rate']:.1f}%) share a "
          f"{r['n']}-{r['unit']} sequence with {what}, {r['train_units']:,} {r['unit']}s read"
          + (f"; {r['too_short']} items shorter than {r['n']} {r['unit']}s not checked"
             if r["too_short"] else ""))
    shown = [row for row in r["rows"] if row["contaminated"]][:args.show]
    for row in shown:
        print(f"  {row['id']}: {row['matched']}/{row['ngrams']} n-grams "
              f"({100 * row['fraction']:.0f}%)")
    if args.json:
        _write_json(args.json, {"eval": args.eval, "train": what, **r})
    return 0


def _perplexity(args) -> int:
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
