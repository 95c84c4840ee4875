"""Domains, the mixture sampler and DoReMi: the weight update against hand-computed values,
the average of the weights, per-token clipping of the excess loss, sampler proportions
(chi-square) and exact resume, the recipe end to end, and errors that name what is wrong."""

from __future__ import annotations

import array
import json
import math
from pathlib import Path

import pytest
import torch

from llmcore.data.domains import (
    DomainShards,
    check_domains_spec,
    prepare_domain_shards,
    stdlib_domain,
)
from llmcore.data.mixture import MixtureBatches, check_weights, load_domain_weights
from llmcore.training.config import TrainConfig, apply, load_config
from llmcore.training.doremi import (
    DomainWeights,
    domain_excess_losses,
    token_losses,
    update_domain_weights,
    weighted_domain_loss,
)

# -- update_domain_weights -------------------------------------------------------------


def test_update_matches_hand_computed_values():
    # w' ∝ [0.5 e^0.1, 0.3 e^0, 0.2 e^0.5] = [0.552585, 0.3, 0.329744] / 1.182329,
    # then 0.999 w' + 0.001 / 3
    out = update_domain_weights([0.5, 0.3, 0.2], [0.1, 0.0, 0.5], eta=1.0, smoothing=1e-3)
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx([0.46723598106857, 0.25381592508388, 0.27894809384755],
                                         abs=1e-12)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-12)


def test_update_formula_eta_and_smoothing_edges():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    e = torch.tensor([0.3, 1.2, 0.0, 0.7], dtype=torch.float64)
    eta, c = 0.5, 0.01
    ref = w * torch.exp(eta * e)
    ref = (1 - c) * ref / ref.sum() + c / 4
    torch.testing.assert_close(update_domain_weights(w, e, eta, c), ref, rtol=0, atol=1e-14)
    # eta = 0: only the smoothing moves the weights; smoothing = 1: uniform
    torch.testing.assert_close(update_domain_weights(w, e, 0.0, 0.0), w, rtol=0, atol=1e-15)
    assert update_domain_weights(w, e, 1.0, 1.0).tolist() == [0.25] * 4


def test_update_is_stable_for_huge_excess():
    out = update_domain_weights([0.5, 0.5], [1e4, 0.0], smoothing=0.0)
    assert torch.isfinite(out).all() and out.tolist() == [1.0, 0.0]


def test_absent_domains_keep_their_weight():
    # domain 1 is absent: its excess (9.0, stale) is ignored and its weight stays 0.3; the
    # present domains share their mass 0.7 by 0.5 e^0.4 : 0.2 e^0
    out = update_domain_weights([0.5, 0.3, 0.2], [0.4, 9.0, 0.0], smoothing=1e-3,
                                present=[True, False, True])
    assert out.tolist() == pytest.approx([0.551776081893094, 0.300033333333333,
                                          0.148190584773573], abs=1e-12)
    # nothing present: only smoothing
    w = [0.7, 0.2, 0.1]
    out = update_domain_weights(w, [5.0, 5.0, 5.0], smoothing=0.0, present=[False] * 3)
    assert out.tolist() == pytest.approx(w, abs=1e-15)


@pytest.mark.parametrize("kwargs, match", [
    ({"excess_losses": [0.1, float("nan"), 0.0]}, r"excess_losses\[1\] is nan"),
    ({"excess_losses": [0.1, float("inf"), 0.0]}, r"excess_losses\[1\] is inf"),
    ({"weights": [0.5, 0.6, 0.2]}, "weights must be >= 0 and sum to 1"),
    ({"weights": [1.2, -0.2, 0.0]}, "weights must be >= 0"),
    ({"weights": [0.5, float("nan"), 0.5]}, r"weights\[1\] is nan"),
    ({"excess_losses": [0.1, 0.2]}, "excess_losses has 2 values for 3 weights"),
    ({"eta": -1.0}, "eta must be"),
    ({"smoothing": 1.5}, "smoothing must be in"),
    ({"present": [True, False]}, "present must have 3 entries"),
    ({"weights": []}, "weights must be a non-empty 1-D"),
])
def test_update_rejects_bad_input(kwargs, match):
    args = {"weights": [0.5, 0.3, 0.2], "excess_losses": [0.1, 0.0, 0.5], **kwargs}
    with pytest.raises(ValueError, match=match):
        update_domain_weights(**args)


def test_average_of_weights_and_state_roundtrip():
    dw = DomainWeights(["a", "b", "c"], eta=1.0, smoothing=1e-3)
    assert dw.average().tolist() == pytest.approx([1 / 3] * 3)  # before any update
    seen = []
    for e in ([0.2, 0.0, 0.1], [0.0, 0.5, 0.0], [0.3, 0.3, 0.0]):
        seen.append(dw.update(e).clone())
    torch.testing.assert_close(dw.average(), torch.stack(seen).mean(0), rtol=0, atol=1e-15)
    state = json.loads(json.dumps(dw.state_dict()))
    other = DomainWeights(["a", "b", "c"])
    other.load_state_dict(state)
    assert other.updates == 3 and other.average().tolist() == dw.average().tolist()
    with pytest.raises(ValueError, match="for domains"):
        DomainWeights(["a", "b"]).load_state_dict(state)


# -- excess and weighted losses --------------------------------------------------------


def test_excess_loss_is_clipped_per_token_before_the_mean():
    proxy = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]])
    ref = torch.tensor([[2.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    dom = torch.tensor([0, 0, 2])
    excess, counts = domain_excess_losses(proxy, ref, dom, 3)
    # domain 0: per-token [-1, 2, 0, 0] -> [0, 2, 0, 0], mean 0.5 (mean-then-clip: 0.25)
    assert excess.tolist() == [0.5, 0.0, 2.0] and counts.tolist() == [4, 0, 2]
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    excess, counts = domain_excess_losses(proxy, ref, dom, 3, mask)
    assert excess.tolist() == [0.0, 0.0, 2.0] and counts.tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match=r"domain_ids must be in \[0, 3\)"):
        domain_excess_losses(proxy, ref, torch.tensor([0, 3, 1]), 3)
    with pytest.raises(ValueError, match="must both be"):
        domain_excess_losses(proxy, ref[:2], dom, 3)


def test_weighted_domain_loss_and_token_losses():
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 6.0]], requires_grad=True)
    dom = torch.tensor([0, 0, 2])
    # present domains 0 (mean 2) and 2 (mean 5); weights 0.2, 0.5 renormalised
    loss = weighted_domain_loss(losses, dom, [0.2, 0.3, 0.5])
    assert float(loss.detach()) == pytest.approx((0.2 * 2 + 0.5 * 5) / 0.7)
    loss.backward()
    assert losses.grad[0, 0] == pytest.approx(0.2 / 0.7 / 4)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    tl = token_losses(logits, labels)
    assert tl.shape == (2, 5)
    torch.testing.assert_close(tl.mean(), torch.nn.functional.cross_entropy(
        logits.reshape(10, 11), labels.reshape(10)))


# -- domains and the sampler -----------------------------------------------------------


def test_stdlib_domain_rule():
    assert stdlib_domain("test/test_os.py") == "tests"
    assert stdlib_domain("idlelib/idle_test/test_run.py") == "tests"
    assert stdlib_domain("unittest/test/test_case.py") == "tests"
    assert stdlib_domain("os.py") == "modules"
    assert stdlib_domain("encodings/cp1252.py") == "encodings"
    assert stdlib_domain("tkinter/__init__.py") == "apps"
    assert stdlib_domain("asyncio/events.py") == "packages"


def make_domains(path: Path, sizes: dict[str, int]) -> DomainShards:
    """Hand-made domain shards: domain i holds token ids 100 i + (0..99)."""
    path.mkdir(parents=True, exist_ok=True)
    for i, (name, n) in enumerate(sizes.items()):
        d = path / name
        d.mkdir()
        toks = [100 * i + (j % 100) for j in range(n)]
        for split in ("train", "val"):
            (d / f"{split}.bin").write_bytes(array.array("H", toks).tobytes())
        info = {"tokens": n, "documents": 1, "bytes": 3 * n}
        (d / "header.json").write_text(json.dumps({
            "format": "llmcore-tokens", "version": 1, "dtype": "uint16", "vocab_size": 512,
            "eos_id": 0, "splits": {"train": info, "val": info}}))
    (path / "domains.json").write_text(json.dumps({"domains": sorted(sizes)}))
    return DomainShards(path)


def test_sampler_proportions_chi_square(tmp_path):
    doms = make_domains(tmp_path, {"a": 400, "b": 600, "c": 300, "d": 500})
    w = {"a": 0.5, "b": 0.3, "c": 0.2}  # d left out: weight 0
    mix = MixtureBatches(doms, w, batch_size=16, seq_len=8, seed=3)
    counts = torch.zeros(4)
    for step in range(200):
        b = mix.batch(step, 0)
        for row, d in zip(b["input_ids"], b["domain"].tolist(), strict=True):
            assert (row // 100 == d).all()  # every token of a row from its domain
        counts += torch.bincount(b["domain"], minlength=4)
    n = counts.sum()
    assert counts[3] == 0
    expected = torch.tensor([0.5, 0.3, 0.2]) * n
    chi2 = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, (counts, chi2)  # df = 2, p = 0.001


def test_sampler_is_a_pure_function_of_seed_step_index(tmp_path):
    doms = make_domains(tmp_path, {"a": 400, "b": 600})
    m1 = MixtureBatches(doms, [0.5, 0.5], 4, 8, seed=1)
    m2 = MixtureBatches(doms, [0.5, 0.5], 4, 8, seed=1)
    for k in ("input_ids", "labels", "domain"):
        assert torch.equal(m1.batch(5, 1)[k], m2.batch(5, 1)[k])
    assert not torch.equal(m1.batch(5, 1)["input_ids"], m1.batch(5, 0)["input_ids"])
    other = MixtureBatches(doms, [0.5, 0.5], 4, 8, seed=2)
    assert not torch.equal(m1.batch(5, 1)["input_ids"], other.batch(5, 1)["input_ids"])
    m1.load_state_dict(m2.state_dict())
    with pytest.raises(ValueError, match=r"differs in \['weights'\]"):
        MixtureBatches(doms, [0.9, 0.1], 4, 8, seed=1).load_state_dict(m2.state_dict())


def test_weights_errors_name_the_argument(tmp_path):
    names = ["a", "b"]
    assert check_weights({"a": 3, "b": 1}, names) == [0.75, 0.25]
    with pytest.raises(ValueError, match=r"domain_weights: unknown domain\(s\) \['z'\]"):
        check_weights({"a": 1, "z": 1}, names, "domain_weights")
    with pytest.raises(ValueError, match="weight of domain 'b' must be a finite number >= 0"):
        check_weights({"a": 1, "b": float("nan")}, names)
    with pytest.raises(ValueError, match="weight of domain 'a'"):
        check_weights([-1, 2], names)
    with pytest.raises(ValueError, match="sum to 0"):
        check_weights({"a": 0}, names)
    with pytest.raises(ValueError, match="3 weights for 2 domains"):
        check_weights([1, 1, 1], names)
    with pytest.raises(ValueError, match="domain_weights: .* not found"):
        load_domain_weights(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="domain_weights: .* not valid JSON"):
        load_domain_weights(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_domain_weights(bad)
    good = tmp_path / "w.json"
    good.write_text(json.dumps({"weights": {"a": 1, "b": 3}, "updates": 5}))
    assert load_domain_weights(good) == {"a": 0.25, "b": 0.75}
    doms = make_domains(tmp_path / "d", {"a": 400, "b": 6})
    with pytest.raises(ValueError, match="domain 'b' has weight 0.5 but its train split holds 6"):
        MixtureBatches(doms, [0.5, 0.5], 4, 8, seed=1)


def test_domain_config_errors():
    with pytest.raises(ValueError, match="config key 'domains' must be"):
        check_domains_spec("by-size", "stdlib")
    with pytest.raises(ValueError, match="'stdlib' splits the stdlib corpus"):
        check_domains_spec("stdlib", ["x.jsonl"])
    with pytest.raises(ValueError, match="domain name 'a b'"):
        check_domains_spec({"a b": ["x"]}, "stdlib")
    with pytest.raises(ValueError, match="domain 'a' needs a path"):
        check_domains_spec({"a": []}, "stdlib")
    with pytest.raises(ValueError, match="config key 'domain_weights' needs config key"):
        apply(TrainConfig(), {"data": ["x.jsonl"], "domain_weights": "uniform"}).validate()
    with pytest.raises(ValueError, match="config key 'doremi.eta' must be"):
        load_config(TrainConfig(), sets=["doremi.eta=-1"])
    with pytest.raises(ValueError, match="config key 'doremi.smothing' is unknown"):
        load_config(TrainConfig(), sets=["doremi.smothing=0.1"])


def test_domains_from_a_jsonl_field_and_separate_inputs(tmp_path, cache):
    from llmcore.data.prepare import ensure_tokenizer

    rows = [{"text": f"def f{i}(x):\n    return x + {i}\n" * 3, "domain": "code" if i % 2
             else "prose"} for i in range(40)]
    rows[4]["domain"] = "code"  # 20 odd rows + this one
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = ensure_tokenizer([str(data)], 300, 0.2, progress=False)
    idx = prepare_domain_shards([str(data)], "field:domain", tok, tmp_path / "out", 0.2)
    assert idx["domains"] == ["code", "prose"]
    doms = DomainShards(tmp_path / "out")
    docs = {n: doms.shards[n].header["splits"] for n in doms.names}
    assert sum(s["train"]["documents"] + s["val"]["documents"] for s in docs.values()) == 40
    assert docs["code"]["train"]["documents"] + docs["code"]["val"]["documents"] == 21
    again = prepare_domain_shards([str(data)], "field:domain", tok, tmp_path / "out", 0.2)
    assert again == idx  # cached by content
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "domain": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'domain' must name a domain"):
        prepare_domain_shards([str(tmp_path / "bad.jsonl")], "field:domain", tok,
                              tmp_path / "out2", 0.2)
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no data files found"):
        prepare_domain_shards("stdlib", {"a": [str(tmp_path / "a.txt")],
                                         "e": [str(tmp_path / "empty")]}, tok,
                              tmp_path / "out3", 0.2)


# -- the recipe and resume -------------------------------------------------------------


def _values(corpus: Path, **over) -> dict:
    values = {"data": [str(corpus)], "val_fraction": 0.2, "vocab_size": 512, "preset": "tiny",
              "steps": 6, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "min_lr": 3e-4,
              "warmup": 1, "eval_every": 0, "eval_tokens": 1024, "sample_tokens": 0,
              "progress": False, "tensorboard": False, "seed": 5, "save_every": 3,
              "domains": {"json": [str(corpus / "json")], "email": [str(corpus / "email")],
                          "http": [str(corpus / "http")],
                          "rest": [str(corpus / "collections"), str(corpus / "logging")]},
              "doremi": {"eval_tokens": 512},
              "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                        "ffn_dim": 64, "max_seq_len": 64}}
    values.update(over)
    return values


def test_doremi_recipe_end_to_end_and_proxy_resume(corpus, cache, tmp_path):
    from llmcore.training.loop import TrainingError
    from llmcore.training.recipes import doremi, pretrain

    cfg = apply(TrainConfig(recipe="doremi"), _values(corpus)).validate()
    full = tmp_path / "full"
    res = doremi.run(cfg, full)
    assert res["stage"] == "done"
    dw = json.loads((full / "domain_weights.json").read_text())
    assert sorted(dw["weights"]) == ["email", "http", "json", "rest"]
    assert sum(dw["weights"].values()) == pytest.approx(1.0) and dw["updates"] == 6
    assert dw["smoothing"] == 1e-3 and sum(dw["baseline"].values()) == pytest.approx(1.0)
    rows = [json.loads(x) for x in (full / "proxy" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") != "val"]
    assert all(f"weight/{n}" in r and f"excess/{n}" in r for r in train for n in dw["weights"])
    summary = json.loads((full / "summary.json").read_text())
    assert set(summary["reference"]) == set(dw["weights"])
    ref_val = json.loads((full / "reference" / "summary.json").read_text())["val"]
    assert ref_val["val_bpb_worst"] == max(ref_val[f"val_bpb/{n}"] for n in dw["weights"])

    # the proxy cut at step 3 and resumed (reusing the reference) ends with the same weights
    cut = tmp_path / "cut"
    cfg_cut = apply(cfg, {"doremi": {"reference": str(full / "reference")}}).validate()
    assert doremi.run(cfg_cut, cut, stop_at=3)["stage"] == "proxy"
    with pytest.raises(TrainingError, match="already holds a doremi run"):
        doremi.run(cfg_cut, cut)
    doremi.run(cfg_cut, cut, resume=True)
    assert json.loads((cut / "domain_weights.json").read_text())["weights"] == dw["weights"]
    rows_cut = [json.loads(x) for x in (cut / "proxy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_cut if r.get("split") != "val"] == \
        [r["loss"] for r in train]

    # the mixture in a pretraining run, cut and resumed: the same batches and losses
    mix = apply(TrainConfig(), _values(corpus, domain_weights=str(full / "domain_weights.json"))
                ).validate()
    a, b = tmp_path / "mix_a", tmp_path / "mix_b"
    pretrain.run(mix, a)
    pretrain.run(mix, b, stop_at=3)
    st = json.loads((b / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert st["data"]["sampler"]["domains"] == sorted(dw["weights"])
    pretrain.run(mix, b, resume=True)
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()
          if "loss" in json.loads(x)]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()
          if "loss" in json.loads(x)]
    assert la == lb
    s = json.loads((a / "summary.json").read_text())
    assert set(s["domains"]) == set(dw["weights"]) and s["mixture"]["json"] == \
        pytest.approx(dw["weights"]["json"])
    # another mixture cannot continue this run
    other = apply(mix, {"domain_weights": {"json": 1.0}}).validate()
    with pytest.raises(TrainingError):
        pretrain.run(other, b, resume=True)
    with pytest.raises(ValueError, match=r"domain_weights: unknown domain\(s\) \['xml'\]"):
        pretrain.run(apply(mix, {"domain_weights": {"xml": 1.0}}).validate(), tmp_path / "x")
    assert not math.isnan(s["val"]["val_bpb_mean"])


@pytest.mark.parametrize("argv, msg", [
    (["train", "pretrain", "--domain-weights", "{tmp}/missing.json", "--out", "{tmp}/r"],
     "config key 'domain_weights': {tmp}/missing.json not found"),
    (["train", "pretrain", "--domain-weights", "{tmp}/w.json", "--out", "{tmp}/r"],
     "the weight of domain 'tests' must be a finite number >= 0, got -1"),
    (["train", "doremi", "--set", "doremi.smoothing=2", "--out", "{tmp}/r"],
     "config key 'doremi.smoothing' must be a number in [0, 1], got 2"),
    (["train", "doremi", "--set", "domains='by-size'", "--out", "{tmp}/r"],
     "config key 'domains' must be"),
])
def test_cli_errors_are_one_line(argv, msg, tmp_path, capsys):
    from llmcore.cli import main

    (tmp_path / "w.json").write_text(json.dumps({"tests": -1, "modules": 1}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and msg.replace("{tmp}", str(tmp_path)) in err, err


def test_cli_lists_the_doremi_configs(capsys):
    from llmcore.cli import main

    assert main(["train", "doremi", "--list-configs"]) == 0
    assert {"tiny", "stdlib"} <= set(json.loads(capsys.readouterr().out))


class _Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a tiny stand-in for a language model."""

    def __init__(self, vocab: int, seed: int, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(scale * torch.randn(vocab, vocab, generator=g))

    def forward(self, ids):
        return self.table[ids]


def test_proxy_step_updates_present_domains_and_rejects_nan():
    from llmcore.training.loop import TrainingError
    from llmcore.training.recipes.doremi import ProxyStep

    ids = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "domain": torch.tensor([0, 0, 1, 1])}
    weights = DomainWeights(["a", "b", "c"], [0.2, 0.3, 0.5], eta=1.0, smoothing=1e-3)
    step = ProxyStep(_Bigram(16, 1), weights)
    proxy = _Bigram(16, 2, scale=3.0)
    loss, metrics = step(proxy, batch)
    w = weights.current
    assert metrics["excess/a"] > 0 and metrics["excess/c"] == 0.0
    assert float(w[2]) == pytest.approx(0.999 * 0.5 + 0.001 / 3)  # c absent: kept
    assert float(w[0] + w[1]) == pytest.approx(0.999 * 0.5 + 0.002 / 3)
    loss.backward()
    assert proxy.table.grad is not None and weights.updates == 1
    with torch.no_grad():
        step.reference.table[ids[0, 0]] = float("nan")
    with pytest.raises(TrainingError, match=r"excess loss of domain\(s\) \['a'\] is not finite"):
        step(proxy, batch)
