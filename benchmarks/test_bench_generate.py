"""pytest-benchmark view of the `llmcore bench generate` suite: prefill and decode steps
of the whole model (random weights) for each backend, dtype, BFP weights and KV cache.

  pytest benchmarks/test_bench_generate.py --benchmark-group-by=param:case
"""

import pytest
import torch
from conftest import run_pedantic

from llmcore.bench import generate as suite

METHODS = {m[0]: m[1:] for m in suite.METHODS}


def cases(device, quick):
    return [(preset, b, steps) for preset, batches, steps in suite.plan(device, quick)
            for b in batches]


def case_id(c):
    return f"{c[0]}-B{c[1]}-steps{c[2]}"


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("method", list(METHODS))
@torch.inference_mode()
def test_generate(benchmark, device, case, method, phase):
    preset, batch, steps = case
    backend, dtype, quant, storage = METHODS[method]
    model = suite.build(preset, backend, dtype, quant, device)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, suite.PROMPT), generator=g)
    prefill, decode = suite.timed_calls(model, prompt.to(device), steps, storage)
    run_pedantic(benchmark, prefill if phase == "prefill" else decode, device, rounds=3,
                 warmup_rounds=1)
