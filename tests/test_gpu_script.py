"""The prepared GPU script benchmarks/gpu/run.sh (docs/testing.md, "The GPU script"): its
dry run lists every step and finds what each needs; a real run of the GPU-free steps
writes the summary; the sanitizer's program runs on the CPU kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
STEPS = ["env", "selftest-build", "selftest", "selftest-sanitize", "build", "pytest", "sanitize",
         "bench"]
SUITES = ["attention", "decode", "bfp", "generate", "assisted", "train"]


def _run(*args, env=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if k not in ("OUT", "STEPS")}
    e["PYTHON"] = sys.executable
    e.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=ROOT)


def test_dry_run_lists_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert f"steps: {' '.join(STEPS)}" in lines[0]
    # each step announces its command, in this order
    firsts = [next(i for i, x in enumerate(lines) if x.startswith(f"run.sh: {s}: "))
              for s in STEPS]
    assert firsts == sorted(firsts), f"steps out of order: {dict(zip(STEPS, firsts, strict=True))}"
    text = proc.stdout
    assert "LLMCORE_CUDA_ARCHS=90a MAX_JOBS=" in text and "setup.py build_ext --inplace" in text
    assert "-m pytest -m cuda -x -q" in text
    assert "-DLLMCORE_CUDA_ARCHS=90a" in text and "--target llmcore_cuda_selftest" in text
    assert "budget 570s" in lines[0]
    assert "--tool memcheck" in text and "--tool racecheck" in text
    for s in SUITES:
        assert f"bench {s} --device cuda --quick" in text and f"ok: suite {s}" in text
    assert "MISSING" not in text and "UNKNOWN" not in text and "0 problem(s)" in text
    assert not out.exists(), "a dry run must write nothing"


def test_dry_run_reports_a_missing_suite(tmp_path):
    proc = _run("--dry-run", str(tmp_path), env={"BENCH_SUITES": "attention nosuch"})
    assert proc.returncode == 1 and "UNKNOWN suite: nosuch" in proc.stdout


def test_gpu_free_steps_write_the_summary(tmp_path):
    """env and the self-test steps (skipped when it is not built) run anywhere."""
    out = tmp_path / "out"
    proc = _run(env={"OUT": str(out), "STEPS": "env selftest selftest-sanitize",
                     "LLMCORE_SELFTEST": str(tmp_path / "absent")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "python" in summary and "torch" in summary
    for step, status in (("env", "ok"), ("selftest", "SKIPPED"), ("selftest-sanitize", "SKIPPED")):
        assert any(x.split()[:1] == [step] and status in x for x in summary.splitlines()), summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]


def test_run_budget_skips_what_it_cannot_fit(tmp_path):
    """A step with under 20 s of the run's budget left is skipped, and says so."""
    out = tmp_path / "out"
    proc = _run(env={"OUT": str(out), "STEPS": "env", "RUN_BUDGET": "10"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert any(x.split()[:2] == ["env", "SKIPPED(budget)"] for x in summary.splitlines()), summary


FAKE_SELFTEST = """#!/bin/bash
if [ "$1" = --list ]; then echo copy; exit 0; fi
if [ "$1" = --only ]; then echo "rest: $2"; echo '{"rest": 1}' > "$4"; exit 0; fi
echo '{"partial": 1}' > "$2"
echo "llmcore_cuda_selftest: stopped by a CUDA error in bfp.gemm; groups not run: decode,kv_cache_append"
exit 3
"""


def test_selftest_stopped_by_a_cuda_error_runs_the_rest(tmp_path):
    """Exit 3 (a CUDA error, the groups not run named): the rest runs once in a fresh
    process, its JSON into the log; a runnable binary is not rebuilt."""
    fake = tmp_path / "selftest"
    fake.write_text(FAKE_SELFTEST)
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = _run(env={"OUT": str(out), "STEPS": "selftest-build selftest",
                     "LLMCORE_SELFTEST": str(fake)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "SKIPPED(prebuilt)" in summary and "FAILED(rc=3)" in summary
    assert any(x.split()[:2] == ["selftest(rest)", "ok"] for x in summary.splitlines()), summary
    log = (out / "selftest.log").read_text()
    assert "rest: decode,kv_cache_append" in log and '{"rest": 1}' in log
    assert sorted(p.name for p in out.iterdir()) == ["selftest.json", "selftest.log", "summary.txt"]


def test_sanitizer_cases_run_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "sanitize_cases.py"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == len(proc.stdout.splitlines()) >= 6, proc.stdout
