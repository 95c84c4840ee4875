"""The torch-free CUDA self-test binary (docs/testing.md, "The CUDA self-test"), where the
CMake check built it (CI: build/cmake-check; by hand: build/cuda-selftest, or
$LLMCORE_SELFTEST): it lists its groups, refuses an unknown one, and without a GPU exits 2
with a message that says so. Skipped where it was not built (no nvcc)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["copy", "bfp.quantize", "bfp.gemv", "bfp.gemm", "attention.fwd", "attention.bwd",
          "decode", "kv_cache_append"]


def _binary() -> Path:
    env = os.environ.get("LLMCORE_SELFTEST")
    candidates = [Path(env)] if env else []
    candidates += [ROOT / "build" / d / "llmcore_cuda_selftest"
                   for d in ("cmake-check", "cuda-selftest")]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.skip("llmcore_cuda_selftest not built (bash cmake/check.sh build/cmake-check)")


def _run(*args):
    return subprocess.run([str(_binary()), *args], capture_output=True, text=True, timeout=60)


def test_lists_its_groups():
    proc = _run("--list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == GROUPS


def test_refuses_an_unknown_group_and_option():
    proc = _run("--only", "attention,nosuch")
    assert proc.returncode == 2 and "unknown group 'nosuch'" in proc.stderr
    proc = _run("--bogus")
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_without_a_gpu_exits_2_with_a_message():
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"],
                                                     capture_output=True).returncode == 0:
        pytest.skip("a GPU is present: benchmarks/gpu/run.sh runs the self-test")
    proc = _run("--reduced")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no usable CUDA device" in proc.stderr and "needs an NVIDIA GPU" in proc.stderr
