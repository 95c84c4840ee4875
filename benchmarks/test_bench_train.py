"""pytest-benchmark view of the `llmcore bench train` suite: one optimizer step (forward,
backward, AdamW) of each method on each shape, on random tokens (the suite itself trains
on the stdlib corpus and also compares losses).

  pytest benchmarks/test_bench_train.py --benchmark-group-by=param:case
"""

import pytest
import torch
from conftest import run_pedantic

from llmcore.bench import train as suite

METHODS = {m[0]: m for m in suite.METHODS}


class RandomTokens:
    """Stands in for token shards: uniform random ids."""

    path = "random"
    vocab_size = suite.VOCAB

    def __init__(self, n: int = 1 << 16):
        self._t = torch.randint(0, self.vocab_size, (n,), generator=torch.Generator()
                                .manual_seed(0)).to(torch.int32)

    def num_tokens(self, split):
        return self._t.numel()

    def tokens(self, split):
        return self._t


def cases(device, quick):
    return [c[:3] for c in suite.plan(device, quick)]


def case_id(c):
    return f"{c[0]}-B{c[1]}-T{c[2]}"


@pytest.mark.parametrize("method", list(METHODS))
def test_train_step(benchmark, device, case, method):
    shape, batch, seq_len = case
    cfg = suite.config(shape, METHODS[method], batch, seq_len, steps=100)
    run = suite._Run(cfg, RandomTokens(), device)
    run_pedantic(benchmark, lambda i: run.advance(1, timed=False), device, rounds=2,
                 warmup_rounds=1)
    assert torch.isfinite(torch.tensor(run.loss))
