"""pytest-benchmark view of the `llmcore bench bfp` suite.

  pytest benchmarks/test_bench_bfp.py --benchmark-group-by=param:case

Each case groups every method at one (M, K, N), so pytest-benchmark's table shows them
side by side; `llmcore bench bfp` prints the same comparison with ratios and writes JSON.
"""

import pytest
import torch
from conftest import run_pedantic

from llmcore.bench import bfp
from llmcore.formats import PRESETS
from llmcore.ops import bfp_quantize

METHODS = [name for name, _, _ in bfp.linear_methods(torch.device("cpu"), 256, 64, 64)]


def cases(device, quick):
    ms_list, shapes, _ = bfp.plan(device, quick)
    return [(m, k, n) for k, n in shapes for m in ms_list]


def case_id(c):
    return f"M{c[0]}-K{c[1]}-N{c[2]}"


@pytest.mark.parametrize("method", METHODS)
def test_linear(benchmark, device, case, method):
    m, k, n = case
    builders = {name: b for name, b, _ in bfp.linear_methods(device, m, k, n)}
    if method not in builders:
        pytest.skip(f"{method} is not a baseline on {device.type}")
    run_pedantic(benchmark, builders[method](), device, rounds=5 if m < 2048 else 3)


@pytest.mark.parametrize("fmt", list(PRESETS))
def test_quantize(benchmark, device, fmt, bench_quick):
    x = torch.randn(*bfp.plan(device, bench_quick)[2], device=device)
    run_pedantic(benchmark, lambda i: bfp_quantize(x, fmt), device, rounds=10)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GBps"] = x.numel() * 4 / benchmark.stats["median"] / 1e9
