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
    print(f"2 MB pages for CPU models and caches: {_hugepages()}")
    return 0


def _hugepages() -> str:
    """Whether hugepages="auto" packs here (llmcore.ops.memory), and why not."""
    import os

    from llmcore.ops.memory import THP_SETTING, hugepages_enabled, thp_mode

    mode = thp_mode()
    if hugepages_enabled():
        return f"yes (transparent huge pages: {mode})"
    if os.environ.get("LLMCORE_HUGEPAGES", "1") == "0":
        return "no (LLMCORE_HUGEPAGES=0)"
    if not _ext.has_op("hugepage_arena"):
        return "no (the extension is not loaded)"
    return f"no (transparent huge pages: {mode})" if mode else f"no ({THP_SETTING} unreadable)"
