"""``llmcore bench``: run benchmark suites against their baselines, write JSON and plots
to a run folder (never into the source checkout)."""

from __future__ import annotations

import argparse
import os

import torch

from llmcore.cli._common import (
    RUNS_DIR,
    CLIError,
    add_device_arg,
    device_from_args,
    int_at_least,
    new_run_dir,
)

EPILOG = f"""\
output:
  Each suite prints a table and writes DIR/<device>/<suite>.json (environment, git
  commit, every figure) and DIR/<device>/<suite>.png, where DIR is --out or, by default,
  a new folder ./{RUNS_DIR}/bench-YYYYmmdd-HHMMSS/ under the current directory.
  The results committed in the repository (benchmarks/results/<device>/) are never
  written by this command: a maintainer copies a run's <device>/ folder there on
  purpose (see benchmarks/README.md).

vs-llamacpp (run only when named):
  llmcore beside llama.cpp on the same checkpoints (CPU, batch 1): decode and prefill
  tokens/s, ratios, weight GB/s, resident memory and the cost of a verification call of
  --verify tokens in decode steps, engines interleaved, medians.
  llama.cpp comes from --llamacpp DIR (a build holding llama-bench and llama-quantize),
  $LLMCORE_LLAMACPP, or `pip install llama-cpp-python`; without one the suite is skipped.
    llmcore bench vs-llamacpp --llamacpp ~/llama.cpp/build --quick
    llmcore bench vs-llamacpp --llamacpp ~/llama.cpp/build --models 110M --pairs mxint8,mxint4
"""


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 ("1,2")."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got "
                                         f"{text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def add_parser(subparsers):
    b = subparsers.add_parser("bench", help="run benchmark suites against their baselines",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("suites", nargs="*", help="suites to run (default: all; see --list)")
    add_device_arg(b)
    b.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    b.add_argument("--out", metavar="DIR",
                   help=f"results folder (default: a new ./{RUNS_DIR}/bench-<time>/)")
    b.add_argument("--no-save", action="store_true", help="print only, write no files")
    b.add_argument("--no-plot", action="store_true", help="write no PNG")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--threads", type=int_list, metavar="N[,N...]",
                   help="torch.set_num_threads for CPU runs (vs-llamacpp: the thread counts "
                        "to compare, default 1,2)")
    b.add_argument("--list", action="store_true", help="list the suites and exit")
    v = b.add_argument_group("vs-llamacpp")
    v.add_argument("--llamacpp", metavar="DIR",
                   help="llama.cpp build folder or install prefix (default: $LLMCORE_LLAMACPP, "
                        "else the llama_cpp Python package)")
    v.add_argument("--converter", metavar="PATH",
                   help="llama.cpp's convert_hf_to_gguf.py (default: the one in the llama.cpp "
                        "source tree above --llamacpp; else llmcore's own GGUF writer)")
    v.add_argument("--model", metavar="DIR", help="a Hugging Face Llama checkpoint to compare "
                   "on (with its tokenizer) instead of the random-weight models")
    v.add_argument("--models", metavar="LIST", help="random-weight models: 110M,1B "
                   "(default: both; --quick: 110M)")
    v.add_argument("--pairs", metavar="LIST", help="format pairs: mxint8 (Q8_0), mxint4 "
                   "(Q4_0), bf16 (BF16), fp32 (F32) (default: all four on the 110M, "
                   "mxint8,mxint4 on the 1B)")
    v.add_argument("--rounds", type=int_at_least(1), help="interleaved rounds (default 3; "
                   "--quick: 1)")
    v.add_argument("--prompt", type=int_at_least(1), help="prompt tokens before decoding "
                   "(default 128; --quick: 64)")
    v.add_argument("--decode", type=int_at_least(1), help="tokens decoded (default 64; "
                   "--quick: 16)")
    v.add_argument("--prefill", type=int_list, metavar="P[,P...]", help="prefill lengths "
                   "(default 128,512; --quick: 64)")
    v.add_argument("--verify", type=int_at_least(0), metavar="V", help="tokens of the "
                   "verification call timed after the prompt, as its cost in decode steps "
                   "(default 5: gamma = 4 drafts; 0: not timed)")
    v.add_argument("--workdir", metavar="DIR", help="where checkpoints and GGUF files are "
                   "made and kept (default: <tmp>/llmcore-vs-llamacpp)")
    v.add_argument("--note", help="a note stored in the JSON (e.g. 'shared machine')")
    a = b.add_argument_group("assisted")
    a.add_argument("--target", metavar="DIR", help="a trained target model directory (a run's "
                   "final/): measure it with --draft on held-out text instead of the "
                   "random-weight rows")
    a.add_argument("--draft", metavar="DIR", help="a trained draft model directory sharing "
                   "the target's tokenizer")
    a.add_argument("--draft-tokens", type=int_list, metavar="G[,G...]",
                   help="starting draft lengths γ, one row each (default 5)")
    a.add_argument("--schedule", choices=("heuristic", "constant"),
                   help="how γ moves between steps: heuristic (the default: it grows while "
                   "every draft is kept) or constant (--draft-tokens at every step)")
    return b


def _suite_options(args, names) -> dict:
    """{suite: keyword arguments} from the suite-specific flags; CLIError for a flag given
    without the suite that takes it, or for a list of threads where one is needed."""
    assisted = _assisted_options(args, names)
    if assisted:
        return assisted
    own = {k: getattr(args, k) for k in ("llamacpp", "converter", "model", "models", "pairs",
                                         "rounds", "prompt", "decode", "prefill", "verify",
                                         "workdir", "note")}
    if "vs-llamacpp" not in names:
        given = [f"--{k}" for k, v in own.items() if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} apply to the vs-llamacpp suite only")
        if args.threads and len(args.threads) > 1:
            raise CLIError("--threads takes one number except for the vs-llamacpp suite")
        return {}
    if len(names) > 1:
        raise CLIError("run vs-llamacpp on its own (it has options of its own)")
    from llmcore.bench.llamacpp import find_converter, find_llamacpp, parse_plan

    try:
        parse_plan(args.models, args.pairs, args.model, args.quick)
        lc = find_llamacpp(args.llamacpp)
        if lc is not None:
            find_converter(lc, args.converter)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CLIError(f"--model {args.model}: no config.json in it")
    own["model_dir"] = own.pop("model")
    return {"vs-llamacpp": {**own, "threads": args.threads}}


def _assisted_options(args, names) -> dict:
    """{"assisted": {...}} from --target/--draft/--draft-tokens, {} when none is given."""
    given = [f"--{k.replace('_', '-')}" for k in ("target", "draft", "draft_tokens", "schedule")
             if getattr(args, k) is not None]
    if not given:
        return {}
    if names != ["assisted"]:
        raise CLIError(f"{', '.join(given)} apply to the assisted suite only (run it on its "
                       "own: llmcore bench assisted --target DIR --draft DIR)")
    if args.target is None or args.draft is None:
        raise CLIError("--target and --draft go together (a trained target and its draft)")
    for flag, path in (("--target", args.target), ("--draft", args.draft)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"{flag} {path}: no config.json in it (a model directory as "
                           "`llmcore train` saves it: RUN/final)")
    if args.threads and len(args.threads) > 1:
        raise CLIError("--threads takes one number except for the vs-llamacpp suite")
    if args.draft_tokens and max(args.draft_tokens) > 15:
        raise CLIError(f"--draft-tokens: each must be in [1, 15], got {args.draft_tokens}")
    return {"assisted": {"target_dir": args.target, "draft_dir": args.draft,
                         "draft_tokens": args.draft_tokens,
                         "schedule": args.schedule or "heuristic"}}


def run(args) -> int:
    from llmcore.bench import SUITES, run_suites, suite_names

    if args.list:
        print("\n".join(sorted(SUITES)))
        return 0
    names = suite_names(args.suites)  # checked before a run folder is made
    options = _suite_options(args, names)
    device = device_from_args(args)
    if args.threads and "vs-llamacpp" not in options:
        torch.set_num_threads(args.threads[0])
    out_dir = None if args.no_save else (args.out or new_run_dir("bench"))
    run_suites(names, device, quick=args.quick, out_dir=out_dir,
               plot=not args.no_plot, progress=not args.no_progress, options=options)
    if out_dir:
        print(f"\nresults in {out_dir}")
    return 0
