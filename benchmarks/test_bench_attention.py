"""pytest-benchmark view of the `llmcore bench attention` suite: fused attention (forward,
forward + backward) beside PyTorch SDPA.

  pytest benchmarks/test_bench_attention.py --benchmark-group-by=param:case
"""

import pytest
from conftest import run_pedantic

from llmcore.bench import attention
from llmcore.bench.attention import cases  # noqa: F401 (the conftest parametrizes over it)


def case_id(c):
    b, h, s, d, causal, dtype = c
    return f"B{b}-H{h}-S{s}-D{d}{'-causal' if causal else ''}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", ["llmcore", attention.BASELINE])
def test_attention(benchmark, device, case, method, backward):
    fn = dict(attention.methods(device, *case, with_backward=backward))[method]
    run_pedantic(benchmark, fn, device)
