"""``llmcore info``: the build (extension, kernels per device) and the devices present."""

from __future__ import annotations

import torch

import llmcore
from llmcore import _ext


def add_parser(subparsers):
    return subparsers.add_parser("info", help="show the build: extension, kernels, devices")


def run(args) -> int:
    print(f"llmcore {llmcore.__version__}, torch {torch.__version__}")
    print(f"extension loaded: {_ext.available()}"
          + ("" if _ext.available() else f" ({_ext.LOAD_ERROR})"))
    for dev in ("cpu", "cuda"):
        ops = [op for op in _ext.OPS if _ext.has_kernel(op, torch.device(dev))]
        print(f"{dev} kernels: {', '.join(ops) or 'none'}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0
