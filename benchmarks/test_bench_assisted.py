"""pytest-benchmark view of the `llmcore bench assisted` suite: assisted generation with
each draft beside plain greedy decoding of the same target (random weights).

  pytest benchmarks/test_bench_assisted.py --benchmark-group-by=param:prompt
"""

import pytest
import torch

from llmcore.bench import assisted as suite
from llmcore.generation import assisted_generate, generate

PLAIN = "plain greedy"
METHODS = [PLAIN, "layer-skip", "self mxint8", "self mxint4", "prompt lookup"]


@pytest.mark.parametrize("method", METHODS)
@torch.inference_mode()
def test_assisted(benchmark, device, method, bench_quick):
    preset, plen, new, _ = suite.plan(bench_quick)
    target = suite.target_model(preset, device)
    prompts = suite.make_prompts(target.config.vocab_size, plen, device)
    if method == PLAIN:
        p = prompts["free text"]
        out = benchmark.pedantic(lambda: generate(target, p, new), rounds=3, warmup_rounds=1)
        assert out.shape == (1, plen + new)
        return
    name, make, case, draft_kv = next(d for d in suite.drafts(target)
                                      if d[0].startswith(method))
    draft, p = make(), prompts[case]
    out, _ = benchmark.pedantic(lambda: assisted_generate(target, draft, p, new,
                                                          draft_cache_storage=draft_kv),
                                rounds=3, warmup_rounds=1)
    assert torch.equal(out, generate(target, p, new)), name  # the same tokens as plain greedy
