"""pytest-benchmark view of the `llmcore bench assisted` suite: assisted generation with
each draft beside plain greedy decoding of the same target (random weights).

  pytest benchmarks/test_bench_assisted.py --benchmark-group-by=param:prompt
"""

import json
import shutil
from pathlib import Path

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


# -- a trained pair (--target / --draft): tiny random models saved as a run saves them ------
def _save_model(path, tok_dir, vocab: int, dim: int, n_layers: int, seed: int) -> str:
    from llmcore.models import Transformer, TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(dim=dim, n_layers=n_layers, n_heads=dim // 16, n_kv_heads=2,
                            ffn_dim=2 * dim, vocab_size=vocab, max_seq_len=256)
    Transformer(cfg).save_pretrained(str(path))
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, path / f.name)
    return str(path)


def _tokenizer(path, seed: int):
    from llmcore.data.corpus import stdlib_documents
    from llmcore.tokenizer import train_tokenizer

    texts = [d.text for _, d in zip(range(20 + seed), stdlib_documents("train"), strict=False)]
    return train_tokenizer(texts[seed:], 320, path, show_progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tok_dir = Path(_tokenizer(root / "tok", 0))
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    return (_save_model(root / "target", tok_dir, vocab, 64, 2, 0),
            _save_model(root / "draft", tok_dir, vocab, 32, 1, 1), root, vocab)


@torch.inference_mode()
def test_trained_pair_rows(pair):
    target, draft, _, _ = pair
    res = suite.run(torch.device("cpu"), quick=True, target_dir=target, draft_dir=draft,
                    draft_tokens=[2, 4])
    rows = res["rows"]
    cases = {r.case for r in rows}
    assert cases == {"B=1 trained target fp32", "B=1 trained target mxint8"}
    for case in cases:
        methods = [r.method for r in rows if r.case == case]
        assert methods == [PLAIN] + [f"trained draft {d} g={g}" for d in ("fp32", "mxint8")
                                     for g in (2, 4)]
    for r in rows:
        if r.method == PLAIN:
            continue
        e = r.extra
        assert 0.0 <= e["acceptance_rate"] <= 1.0 and e["draft_cost_ratio"] > 0
        assert e["new_tokens"] == 2 * res["extra"]["new_tokens"]  # both prompts, all emitted
        assert r.ratios[PLAIN] > 0 and e["verify_cost_ratio"] > 0
    assert len(set(res["extra"]["prompts"])) == 2  # two held-out documents
    assert res["extra"]["params"]["target"] > res["extra"]["params"]["draft"]
    assert "trained draft mxint8 g=4" in res["text"]
    assert {r.extra.get("schedule") for r in rows if r.method != PLAIN} == {"heuristic"}


@torch.inference_mode()
def test_trained_pair_constant_schedule(pair):
    """schedule="constant": every step proposes γ drafts (the mean draft length is γ, or
    less where the end of the output cuts a step short), outputs still plain greedy's."""
    target, draft, _, _ = pair
    res = suite.run(torch.device("cpu"), quick=True, target_dir=target, draft_dir=draft,
                    draft_tokens=[3], schedule="constant")
    assert res["extra"]["schedule"] == "constant" and "constant schedule" in res["text"]
    for r in res["rows"]:
        if r.method != PLAIN:
            assert r.extra["schedule"] == "constant"
            assert 1.0 <= r.extra["mean_draft_length"] <= 3.0


@torch.inference_mode()
def test_trained_pair_checks_outputs(pair, monkeypatch):
    """An assisted output that is not plain greedy's is an error, not a row."""
    target, draft, _, _ = pair
    real = suite.assisted_generate

    def wrong(*a, **k):
        out, st = real(*a, **k)
        out = out.clone()
        out[0, -1] = (out[0, -1] + 1) % 7
        return out, st
    monkeypatch.setattr(suite, "assisted_generate", wrong)
    with pytest.raises(RuntimeError, match="differs from plain greedy"):
        suite.run(torch.device("cpu"), quick=True, target_dir=target, draft_dir=draft)


def test_trained_pair_errors(pair):
    target, draft, root, vocab = pair
    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="--draft .*no config.json"):
        suite.load_pair(target, str(root / "missing"), cpu)
    with pytest.raises(FileNotFoundError, match="--target .*no tokenizer.json"):
        suite.load_pair(_save_model(root / "notok", None, vocab, 32, 1, 2), draft, cpu)
    wide = _save_model(root / "wide", None, vocab + 8, 32, 1, 3)
    with pytest.raises(ValueError, match=f"vocab_size {vocab + 8}.*target's tokenizer"):
        suite.load_pair(target, wide, cpu)
    other = Path(_tokenizer(root / "tok2", 5))
    n = len(json.loads((other / "tokenizer.json").read_text())["model"]["vocab"])
    assert n == vocab  # a tokenizer of the same size trained on other text
    with pytest.raises(ValueError, match="tokenizer other than"):
        suite.load_pair(target, _save_model(root / "othertok", other, vocab, 32, 1, 4), cpu)


@pytest.mark.parametrize("argv, message", [
    (["--target", "T"], "--target and --draft go together"),
    (["--schedule", "constant"], "--target and --draft go together"),
    (["--target", "T", "--draft", "D", "generate"], "apply to the assisted suite only"),
    (["--draft-tokens", "3", "--target", "nowhere", "--draft", "D"], "--target nowhere: no "
     "config.json"),
])
def test_trained_pair_cli_errors(argv, message, capsys):
    from llmcore.cli import main

    suites = [a for a in argv if a == "generate"] or ["assisted"]
    flags = [a for a in argv if a != "generate"]
    assert main(["bench", *suites, "--no-save", *flags]) == 2
    assert message in capsys.readouterr().err
