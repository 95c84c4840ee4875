"""pytest-benchmark view of the `llmcore bench decode` suite: one decode-attention step
over a full KV cache (16-bit and MXINT8) beside SDPA and a naive implementation.

  pytest benchmarks/test_bench_decode.py --benchmark-group-by=param:case
"""

import pytest
from conftest import run_pedantic

from llmcore.bench import decode
from llmcore.bench.decode import cases  # noqa: F401 (the conftest parametrizes over it)


def case_id(c):
    return f"B{c[0]}-ctx{c[1]}"


@pytest.mark.parametrize("method", ["SDPA", "naive", "llmcore 16-bit cache",
                                    "llmcore mxint8 cache"])
def test_decode_attention(benchmark, device, case, method):
    calls = decode.methods(device, *case, decode.cache_dtype(device))
    names = [name for name, _, _ in calls]
    names[2] = "llmcore 16-bit cache"  # "llmcore bfloat16 cache" / "llmcore float16 cache"
    fn = dict(zip(names, [fn for _, fn, _ in calls], strict=True))[method]
    run_pedantic(benchmark, fn, device)
