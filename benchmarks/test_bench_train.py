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


def _random_examples(n: int, seed: int = 0):
    """Examples of the stdlib sets' typical lengths (prompt ~60, answer ~90 tokens, spread
    out), with random ids: the suite uses the real sets."""
    from llmcore.data.examples import Encoded, EncodedPair

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = (int(x) for x in torch.randint(20, 120, (2,), generator=g))
        ids = torch.randint(3, suite.VOCAB, (p + a,), generator=g).tolist()
        out.append(Encoded(ids, [0] * p + [1] * a))
    pairs = [EncodedPair(e, Encoded(e.ids[:-3] + [5, 6, 7], e.mask)) for e in out]
    return out, pairs


@pytest.mark.parametrize("method", ["sft padded", "sft packed", "dpo live reference",
                                    "dpo cached reference"])
def test_posttrain_step(benchmark, device, bench_quick, method):
    per_step, pairs_per_step, rounds, per_round = suite.post_plan(bench_quick)
    examples, pairs = _random_examples(per_step * 4)
    state = {}

    def capture(rows):
        state["rows"] = rows
    run_pedantic(benchmark, lambda i: capture(suite.posttrain_cases(
        device, examples, pairs, per_step, pairs_per_step, 1, 1, methods=[method])),
        device, rounds=1, warmup_rounds=0)
    assert [r.method for r in state["rows"]] == [method]
