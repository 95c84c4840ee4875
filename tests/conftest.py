"""Fixtures for the llmcore tests (the shared helpers are in tests/helpers/).

- ``device``: every device test runs on "cpu" and on "cuda" (skipped without a GPU).
- every test starts from its own seed (derived from the test id), so inputs are fresh per
  test yet reproducible.
- ``cpu_isa``: runs a test once per CPU kernel path (LLMCORE_CPU_ISA, read on every call).
- ``isa``: the best CPU path and the portable one (one run on CUDA).
- ``corpus``, ``cache``: a slice of the stdlib and a private LLMCORE_CACHE (training).
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA

from llmcore.data.corpus import stdlib_root

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
CPU_ISAS = [
    "scalar",
    pytest.param("avx2", marks=pytest.mark.skipif("avx2" not in _FLAGS or "fma" not in _FLAGS,
                                                  reason="CPU lacks AVX2/FMA")),
    pytest.param("avx512", marks=pytest.mark.skipif(
        not {"avx512f", "avx512bw", "avx512vl"} <= _FLAGS, reason="CPU lacks AVX-512")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request, monkeypatch) -> str:
    """Select one CPU kernel path for the test (the kernels read the variable per call)."""
    monkeypatch.setenv("LLMCORE_CPU_ISA", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=["best", "scalar"])
def isa(request, device, monkeypatch) -> str:
    """The CPU decode kernels' paths: the best the CPU has (AVX-512) and the portable one
    (LLMCORE_CPU_ISA, read on every call). One run on CUDA."""
    if request.param == "scalar":
        if device.type != "cpu":
            pytest.skip("CPU ISA selection")
        monkeypatch.setenv("LLMCORE_CPU_ISA", "scalar")
    else:
        monkeypatch.delenv("LLMCORE_CPU_ISA", raising=False)
    return request.param


# A small slice of the real stdlib corpus: enough text for a 512-token BPE and a few dozen
# steps, small enough to tokenise in a second.
STDLIB_SLICE = ("json", "email/mime", "collections", "http", "logging", "csv.py", "textwrap.py",
                "string.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "glob.py")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder with a slice of the real standard library (about 90 files)."""
    out = tmp_path_factory.mktemp("corpus")
    root = stdlib_root()
    for name in STDLIB_SLICE:
        src = root / name
        files = [src] if src.is_file() else sorted(src.rglob("*.py"))
        for f in files:
            if "__pycache__" in f.parts:
                continue
            dst = out / f.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    return out


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """LLMCORE_CACHE pointed at a session folder: tokenizers and shards made by the tests
    are shared between them and never touch the user's cache."""
    path = tmp_path_factory.mktemp("llmcore-cache")
    old = os.environ.get("LLMCORE_CACHE")
    os.environ["LLMCORE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LLMCORE_CACHE", None)
    else:
        os.environ["LLMCORE_CACHE"] = old
