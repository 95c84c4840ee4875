"""Pieces every command shares: the user-error type, the device choice, run folders."""

from __future__ import annotations

import datetime
import os

import torch

# Where commands put what they write when no --out is given: under the current directory,
# never inside the installed package or the source checkout.
RUNS_DIR = "llmcore-runs"


class CLIError(Exception):
    """A mistake in the command line or its inputs: ``llmcore`` prints it as one line,
    ``llmcore <command>: <message>``, with no traceback, and exits with status 2."""


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
