"""``llmcore plot RUN_DIR``: PNG curves of a training run."""

from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("plot", help="plot a training run's curves as PNG")
    p.add_argument("run_dir", help="a run directory (with metrics.jsonl)")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")
    return p


def run(args) -> int:
    from llmcore.training.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0
