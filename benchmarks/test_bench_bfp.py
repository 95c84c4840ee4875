"""pytest-benchmark view of the `llmcore bench bfp` suite.

  pytest benchmarks/test_bench_bfp.py --benchmark-group-by=param:case

Each case groups every method at one (M, K, N), so pytest-benchmark's table shows them
side by side; `llmcore bench bfp` prints the same comparison with ratios and writes JSON.
"""

import pytest
import torch

from llmcore.bench.bfp import _linear_methods
from llmcore.formats import PRESETS
from llmcore.ops import bfp_quantize

CASES = [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096), (2048, 4096, 4096)]
METHODS = [name for name, _, _ in _linear_methods(torch.device("cpu"), 256, 64, 64)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}")
@pytest.mark.parametrize("method", METHODS)
def test_linear(benchmark, device, case, method):
    m, k, n = case
    builders = {name: b for name, b, _ in _linear_methods(device, m, k, n)}
    if method not in builders:
        pytest.skip(f"{method} is not a baseline on {device.type}")
    fn = builders[method]()
    state = {"i": 0}

    def call():
        fn(state["i"])
        state["i"] += 1
        _sync(device)

    benchmark.pedantic(call, rounds=5 if m < 2048 else 3, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("fmt", list(PRESETS))
def test_quantize(benchmark, device, fmt):
    x = torch.randn(4096, 4096, device=device)

    def call():
        bfp_quantize(x, fmt)
        _sync(device)

    benchmark.pedantic(call, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info["GBps"] = x.numel() * 4 / benchmark.stats["median"] / 1e9
