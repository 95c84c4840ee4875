"""The pytest-benchmark views of the `llmcore bench` suites share these fixtures.

A view takes its sizes from its suite: the suite's ``--quick`` sizes by default (so
``python -m pytest benchmarks -q --benchmark-disable`` is a fast smoke run), its full
sizes with ``--bench-full``. A view module lists them in ``cases(device, quick)``; a test
that takes ``device`` and ``case`` runs once per device (CPU, and CUDA when present) and
case.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="the full sizes of `llmcore bench` (default: its --quick sizes)")


def _devices() -> list[torch.device]:
    return [torch.device(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()]


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames:
        return
    quick = not metafunc.config.getoption("--bench-full")
    if "case" in metafunc.fixturenames:
        mod = metafunc.module
        pairs = [(d, c) for d in _devices() for c in mod.cases(d, quick)]
        metafunc.parametrize("device,case", pairs,
                             ids=[f"{d.type}-{mod.case_id(c)}" for d, c in pairs])
    else:
        metafunc.parametrize("device", _devices(), ids=lambda d: d.type)


@pytest.fixture
def bench_quick(request) -> bool:
    return not request.config.getoption("--bench-full")


def run_pedantic(benchmark, fn, device, rounds: int = 5, warmup_rounds: int = 2):
    """Time ``fn(i)`` (i: call index, for rotating inputs) with a device sync per call."""
    from llmcore.bench.common import sync

    state = {"i": 0}

    def call():
        fn(state["i"])
        state["i"] += 1
        sync(device)

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
