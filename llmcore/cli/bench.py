"""``llmcore bench``: run benchmark suites against their baselines, write JSON and plots
to a run folder (never into the source checkout)."""

from __future__ import annotations

import argparse

import torch

from llmcore.cli._common import (
    RUNS_DIR,
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
"""


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
    b.add_argument("--threads", type=int_at_least(1), help="torch.set_num_threads for CPU runs")
    b.add_argument("--list", action="store_true", help="list the suites and exit")
    return b


def run(args) -> int:
    from llmcore.bench import SUITES, run_suites, suite_names

    if args.list:
        print("\n".join(sorted(SUITES)))
        return 0
    names = suite_names(args.suites)  # checked before a run folder is made
    device = device_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = None if args.no_save else (args.out or new_run_dir("bench"))
    run_suites(names, device, quick=args.quick, out_dir=out_dir,
               plot=not args.no_plot, progress=not args.no_progress)
    if out_dir:
        print(f"\nresults in {out_dir}")
    return 0
