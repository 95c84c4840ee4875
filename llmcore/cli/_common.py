"""Pieces every command shares: the user-error type, the device choice, run folders."""

from __future__ import annotations

import argparse
import datetime
import math
import os

import torch

# Where commands put what they write when no --out is given: under the current directory,
# never inside the installed package or the source checkout.
RUNS_DIR = "llmcore-runs"


class CLIError(Exception):
    """A mistake in the command line or its inputs: ``llmcore`` prints it as one line,
    ``llmcore <command>: <message>``, with no traceback, and exits with status 2."""


def int_at_least(lo: int):
    """An argparse type: an integer >= lo (a bad value is a one-line usage error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in [lo, hi] (either end open on request)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
            v < hi if hi_open else v <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def add_device_arg(parser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")


def device_from_args(args) -> torch.device:
    """``--device``, or CUDA when there is one; a CLIError for CUDA without a GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA device is available")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def new_run_dir(command: str, root: str = RUNS_DIR) -> str:
    """A new folder ``<root>/<command>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... when that
    second is taken); returns its path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, f"{command}-{stamp}")
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"
