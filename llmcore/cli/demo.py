"""``llmcore demo``: the whole library end to end on the Python standard library, with no
download: kernels checked and timed, pretraining (fp32 and MXINT8 GEMMs) against xz, the
cleaning pipeline, SFT then preference tuning, plain vs assisted generation, and the
Chinchilla fit turned into a plan for this machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llmcore.cli._common import CLIError, add_device_arg, device_from_args, new_run_dir

EPILOG = """\
output:
  A run folder (--out, default a new ~/llmcore-runs/demo-YYYYmmdd-HHMMSS/, or under
  $LLMCORE_RUNS when set) with <section>.json for every section, the plots as PNG,
  summary.json, index.html that shows it all on one page, and the trained models under
  runs/. Tokenizers, shards and the stdlib task sets are cached in $LLMCORE_CACHE
  (default ~/.cache/llmcore). Nothing is written into the source checkout.

sizes:
  --quick   a slice of the stdlib and small models: about 2 minutes on 2 CPU cores
  (full)    the whole stdlib: about 10 minutes on 2 CPU cores (the first run also builds
            the cached tokenizer, shards and task sets)
"""


def default_root() -> str:
    return os.environ.get("LLMCORE_RUNS") or str(Path.home() / "llmcore-runs")


def add_parser(subparsers):
    from llmcore.demo import SECTIONS

    p = subparsers.add_parser("demo", help="the library end to end in minutes (no download)",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ~2-minute version")
    p.add_argument("--out", metavar="DIR", help="run folder (default: a new "
                   "~/llmcore-runs/demo-<time>/)")
    p.add_argument("--preference", choices=["dpo", "ipo", "slic", "hinge"], default="dpo",
                   help="the preference loss of the post-training section")
    p.add_argument("--sections", default=",".join(SECTIONS), metavar="NAME,...",
                   help=f"comma-separated subset of {','.join(SECTIONS)} (posttrain and "
                        "generation need pretrain's models in the same --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_arg(p)
    return p


def _inside_checkout(path: Path) -> bool:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return False
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def run(args) -> int:
    from llmcore.demo import Demo

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    device = device_from_args(args)
    out = Path(args.out) if args.out else None
    if out is not None and _inside_checkout(out):
        raise CLIError(f"--out {out} is inside the llmcore checkout; give a folder outside it")
    demo = Demo(out or Path("."), quick=args.quick, device=device,
                preference=args.preference, sections=sections,
                progress=not args.no_progress)  # checks the sections before any work
    demo.out = Path(out if out is not None else new_run_dir("demo", default_root()))
    summary = demo.run()
    print("\nsummary")
    for line in summary["headline"]:
        print(f"  {line}")
    print(f"\ndemo finished in {summary['seconds']:.0f} s: open {demo.out / 'index.html'}")
    return 0
