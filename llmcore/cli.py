"""The `llmcore` command.

  llmcore bench [SUITE ...] [--device cpu|cuda] [--quick] [--out DIR] [--no-plot]
  llmcore info
"""

from __future__ import annotations

import argparse
import sys


def _cmd_bench(args) -> int:
    import torch

    from llmcore.bench import DEFAULT_OUT, SUITES, run_suites

    if args.list:
        print("\n".join(sorted(SUITES)))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("llmcore bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_suites(args.suites, device, quick=args.quick,
                   out_dir=None if args.no_save else (args.out or DEFAULT_OUT),
                   plot=not args.no_plot, progress=not args.no_progress)
    except ValueError as e:
        print(f"llmcore bench: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_info(args) -> int:
    import torch

    import llmcore
    from llmcore import _ext

    print(f"llmcore {llmcore.__version__}, torch {torch.__version__}")
    print(f"extension loaded: {_ext.available()}"
          + ("" if _ext.available() else f" ({_ext.LOAD_ERROR})"))
    for dev in ("cpu", "cuda"):
        ops = [op for op in _ext.OPS if _ext.has_kernel(op, torch.device(dev))]
        print(f"{dev} kernels: {', '.join(ops) or 'none'}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmcore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="run benchmark suites against their baselines")
    b.add_argument("suites", nargs="*", help="suites to run (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    b.add_argument("--out", help="results folder (default: benchmarks/results)")
    b.add_argument("--no-save", action="store_true", help="print only, write no files")
    b.add_argument("--no-plot", action="store_true", help="write no PNG")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    b.add_argument("--list", action="store_true", help="list the suites and exit")
    b.set_defaults(fn=_cmd_bench)

    i = sub.add_parser("info", help="show the build: extension, kernels, devices")
    i.set_defaults(fn=_cmd_info)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
