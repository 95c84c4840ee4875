"""Post-training: the packed forward, rows and their masks, batches, the reward model,
cached reference log-probs, and short runs of the SFT, reward and preference recipes."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmcore.data.examples import (
    BadRowError,
    Encoded,
    EncodedPair,
    Renderer,
    Row,
    encode_rows,
    read_rows,
)
from llmcore.models import RewardModel, Transformer, TransformerConfig
from llmcore.tokenizer import load_tokenizer
from llmcore.training.batching import (
    IGNORE,
    PairBatches,
    SFTBatches,
    labels_of,
    pack_bins,
    packed_batch,
    padded_batch,
    pair_batch,
)
from llmcore.training.config import TrainConfig, apply
from llmcore.training.losses import cross_entropy, packed_sequence_logprobs, sequence_logprobs
from llmcore.training.recipes import dpo, reward, sft
from llmcore.training.recipes.pretrain import init_weights
from llmcore.training.reference import load_or_compute, pair_logprobs, reference_logprobs

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("apple", "river", "stone", "cloud", "paper", "tiger", "glass", "honey", "metal",
         "ocean", "pepper", "silver", "window", "forest", "castle", "rocket", "violet",
         "garden", "button", "candle", "dragon", "falcon", "marble", "needle")


def tiny_config(**over) -> TransformerConfig:
    kw = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
          "ffn_dim": 128, "max_seq_len": 256}
    kw.update(over)
    return TransformerConfig.from_name("tiny", **kw)


@pytest.fixture(scope="module")
def tok_dir(corpus, cache) -> Path:
    from llmcore.data.prepare import ensure_tokenizer

    return ensure_tokenizer([str(corpus)], 512, 0.2, progress=False)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def save_model(path: Path, tok_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    m = Transformer(tiny_config())
    init_weights(m)
    m.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir) -> Path:
    return save_model(tmp_path_factory.mktemp("start"), tok_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Repeat the word {w} twice.", "response": f"{w} {w}"}
            for w in (rng.choice(WORDS) for _ in range(n))]


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        out.append({"prompt": f"Tell me about {w}.", "chosen": f"The {w} is good and kind.",
                    "rejected": f"The {w} is bad and cruel.",
                    "corruption": "polarity" if i % 2 else "tone"})
    return out


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sft")
    write_jsonl(d / "train.jsonl", sft_rows(160, 1))
    write_jsonl(d / "val.jsonl", sft_rows(24, 2))
    return d


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    write_jsonl(d / "train.jsonl", pair_rows(160, 3))
    write_jsonl(d / "val.jsonl", pair_rows(24, 4))
    return d


def post_cfg(model_dir: Path, data: Path, recipe: str, **over) -> TrainConfig:
    values = {"recipe": recipe, "init_from": str(model_dir), "data": str(data), "steps": 30,
              "batch_size": 4, "seq_len": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup": 2,
              "eval_every": 0, "eval_before": True, "progress": False, "tensorboard": False,
              "seed": 3, "weight_decay": 0.0}
    values.update(over)
    return apply(TrainConfig(), values).validate()


def val_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("split") == "val"]


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("split") != "val"]


# ------------------------------------------------------------------------- packed forward

@pytest.mark.parametrize("backend", ["llmcore", "torch"])
def test_packed_forward_equals_each_sequence_alone(backend):
    torch.manual_seed(0)
    model = Transformer(tiny_config(), backend=backend)
    lens = [5, 17, 1, 33, 2]
    seqs = [torch.randint(0, 512, (n,)) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    packed = model(torch.cat(seqs)[None], cu_seqlens=cu)
    alone = [model(s[None])[0] for s in seqs]
    for i, a in enumerate(alone):
        torch.testing.assert_close(packed[0, cu[i]:cu[i + 1]], a, atol=2e-5, rtol=1e-5)
    # and the gradients: one packed backward == the sum of the separate ones
    w = torch.randn_like(packed)
    (packed * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum((a * w[0, cu[i]:cu[i + 1]]).sum() for i, a in enumerate(alone)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("cu, match", [
    ([1, 4, 8], "start at 0"), ([0, 4, 4, 8], "no empty"), ([0, 4, 9], "end at"),
    ([0, 8], None)])
def test_packed_forward_checks_cu_seqlens(cu, match):
    model = Transformer(tiny_config())
    ids = torch.randint(0, 512, (1, 8))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    if match is None:
        assert model(ids, cu_seqlens=cu_t).shape == (1, 8, 512)
        with pytest.raises(ValueError, match="one packed row"):
            model(ids.expand(2, 8), cu_seqlens=cu_t)
        with pytest.raises(ValueError, match="cu_seqlens must be a 1-D"):
            model(ids, cu_seqlens=cu_t.float())
        return
    with pytest.raises(ValueError, match=match):
        model(ids, cu_seqlens=cu_t)


def test_packed_sequence_logprobs_equal_sequence_logprobs():
    torch.manual_seed(1)
    lens = [4, 9, 2, 7]
    logits = torch.randn(sum(lens), 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (sum(lens),))
    labels[torch.rand(sum(lens)) < 0.3] = IGNORE
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    sums, counts = packed_sequence_logprobs(logits[None], labels[None], cu)
    for i in range(len(lens)):
        sl = slice(cu[i], cu[i + 1])
        lab = labels[sl]
        mask = lab != IGNORE
        ref = sequence_logprobs(logits[sl][None], torch.where(mask, lab, 0)[None], mask[None])
        torch.testing.assert_close(sums[i].double(), ref[0].double(), atol=1e-5, rtol=1e-5)
        assert counts[i] == mask.sum()


# ---------------------------------------------------------------------- rows and masks

def test_chat_template_masks_exactly_the_answer(tok):
    r = Renderer(tok, 256)
    e = r.sft(Row("x", {"prompt": "Say hi.", "response": "hi there"}))
    answer = [i for i, m in zip(e.ids, e.mask, strict=True) if m]
    prompt = [i for i, m in zip(e.ids, e.mask, strict=True) if not m]
    assert tok.decode(answer, skip_special_tokens=False) == "hi there<|eos|>\n"
    assert tok.decode(prompt, skip_special_tokens=False) == "<|user|>\nSay hi.<|eos|>\n<|assistant|>\n"
    assert e.ids[:len(prompt)] == prompt  # prompt first, then the answer
    assert prompt == r.prompt_ids("Say hi.")  # what a generation starts from
    # a conversation: both assistant turns count, the user turns and the system do not
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a?"},
            {"role": "assistant", "content": "A."}, {"role": "user", "content": "b?"},
            {"role": "assistant", "content": "B."}]
    e = r.sft(Row("x", {"messages": msgs}))
    spans, cur = [], []
    for i, m in zip(e.ids, e.mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tok.decode(s, skip_special_tokens=False) for s in spans if s] == \
        ["A.<|eos|>\n", "B.<|eos|>\n"]


def test_without_a_template_the_answer_ends_with_eos(tok_dir, tok):
    plain = load_tokenizer(tok_dir)
    plain.chat_template = None
    e = Renderer(plain, 256).sft(Row("x", {"prompt": "abc ", "response": "def"}))
    assert e.ids[-1] == tok.eos_token_id and e.mask[-1] == 1
    assert tok.decode([i for i, m in zip(e.ids, e.mask, strict=True) if m],
                      skip_special_tokens=False) == "def<|eos|>"
    assert tok.decode([i for i, m in zip(e.ids, e.mask, strict=True) if not m]) == "abc "


def test_long_answers_are_cut_and_counted(tok):
    r = Renderer(tok, 32)
    stats: Counter = Counter()
    rows = [Row("f:1", {"prompt": "p", "response": "word " * 50}),
            Row("f:2", {"prompt": "p", "response": "ok"})]
    out = encode_rows(rows, r, "sft", stats=stats)
    assert [len(e) for e in out][0] == 32 and out[0].truncated and not out[1].truncated
    assert stats["truncated"] == 1


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p"}, "missing field 'response'"),
    ({"prompt": "p", "response": "  "}, "field 'response' is empty"),
    ({"prompt": 3, "response": "r"}, "'prompt' must be a string"),
    ({"text": "x"}, "needs 'prompt' and 'response', or 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "q"}]}, r"messages\[0\]"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_sft_rows_name_file_and_line(tmp_path, row, match):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(BadRowError, match=match) as e:
        read_rows(f, "sft")
    assert f"{f}:2" in str(e.value)
    stats: Counter = Counter()
    assert len(read_rows(f, "sft", skip_bad_rows=True, stats=stats)) == 1
    assert stats["skipped"] == 1 and stats["rows"] == 1


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, row, match):
    f = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(BadRowError, match=match) as e:
        read_rows(f, "preference")
    assert f"{f}:1" in str(e.value)


def test_invalid_json_and_long_prompts_name_the_row(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{not json\n', encoding="utf-8")
    with pytest.raises(BadRowError, match=f"{f}:2: not valid JSON"):
        read_rows(f, "sft")
    rows = [Row("g.jsonl:7", {"prompt": "long " * 100, "response": "x"})]
    with pytest.raises(BadRowError, match="g.jsonl:7: the prompt is .* no room"):
        encode_rows(rows, Renderer(tok, 32), "sft")
    stats: Counter = Counter()
    assert encode_rows(rows, Renderer(tok, 32), "sft", True, stats) == [] and stats["skipped"] == 1


def test_bad_rows_through_the_recipe_and_the_cli(tmp_path, model_dir, capsys):
    from llmcore.cli import main

    d = tmp_path / "data"
    write_jsonl(d / "train.jsonl", sft_rows(20, 5) + [{"prompt": "no answer"}])
    write_jsonl(d / "val.jsonl", sft_rows(4, 6))
    args = ["train", "sft", "--set", f"init_from={json.dumps(str(model_dir))}", "--set",
            f"data={json.dumps(str(d))}", "--set", "steps=2", "--set", "warmup=0", "--set",
            "seq_len=64", "--set", "progress=false", "--set", "tensorboard=false"]
    assert main(args + ["--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'train.jsonl'}:21: missing field 'response'" in err and "Traceback" not in err
    assert main(args + ["--skip-bad-rows", "--out", str(tmp_path / "r2")]) == 0
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["data"]["skipped"] == 1 and summary["data"]["train"] == 20
    assert main(["train", "sft", "--out", str(tmp_path / "r3")]) == 2
    assert "'init_from' is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------ batches

def test_pack_bins_best_fit_decreasing():
    lens = [7, 3, 5, 2, 8, 1, 4]
    bins = pack_bins(lens, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lens)))
    assert all(sum(lens[i] for i in b) <= 10 for b in bins)
    assert len(bins) == math.ceil(sum(lens) / 10)  # 30 tokens fit exactly in 3 bins
    with pytest.raises(ValueError):
        pack_bins([11], 10)


def _examples(tok, n=9, seed=0):
    r = Renderer(tok, 64)
    return [r.sft(Row("x", d)) for d in sft_rows(n, seed)]


def test_packed_loss_equals_unpacked_loss_per_example(tok):
    torch.manual_seed(2)
    model = Transformer(tiny_config())
    ex = _examples(tok)
    packed = packed_batch(ex)
    sums, counts = packed_sequence_logprobs(
        model(packed["input_ids"], cu_seqlens=packed["cu_seqlens"]), packed["labels"],
        packed["cu_seqlens"])
    for i, e in enumerate(ex):
        alone = packed_batch([e])
        nll = cross_entropy(model(alone["input_ids"]), alone["labels"], reduction="sum")
        torch.testing.assert_close(-sums[i], nll, atol=1e-4, rtol=1e-5)
        assert counts[i] == sum(e.mask[1:])
    # the SFT step: packed and padded give the same mean answer-token loss
    padded = padded_batch(ex, pad_id=2)
    lp, _ = sft.step_fn(model, packed)
    ld, _ = sft.step_fn(model, padded)
    torch.testing.assert_close(lp, ld, atol=1e-5, rtol=1e-5)
    assert packed["num_tokens"] == padded["num_tokens"] == sum(len(e) for e in ex)


def test_padding_and_prompt_tokens_carry_no_loss(tok):
    torch.manual_seed(3)
    model = Transformer(tiny_config())
    ex = _examples(tok, 5, 1)
    a = padded_batch(ex, pad_id=2)
    b = padded_batch(ex, pad_id=7)  # other pad ids
    wider = [Encoded(e.ids + [0] * 9, e.mask + [0] * 9) for e in ex]  # padding that is "data"
    c = padded_batch(wider, pad_id=2)
    la, lb, lc = (sft.step_fn(model, x)[0] for x in (a, b, c))
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(la, lc, atol=1e-6, rtol=1e-6)
    for e in ex:  # labels: only answer tokens are predicted
        labels = labels_of(e)
        for t, lab in enumerate(labels[:-1]):
            assert (lab == IGNORE) == (e.mask[t + 1] == 0)
        assert labels[-1] == IGNORE


def test_batches_are_a_pure_function_of_step_and_index(tok):
    ex = _examples(tok, 40, 2)
    a = SFTBatches(ex, 2, 64, seed=5, micro_per_step=2)
    b = SFTBatches(ex, 2, 64, seed=5, micro_per_step=2)
    for step, idx in [(3, 1), (0, 0), (50, 1)]:  # any order, beyond one epoch
        assert torch.equal(a.batch(step, idx)["input_ids"], b.batch(step, idx)["input_ids"])
    seen = Counter()
    for g in range(len(a.groups) // 2):  # one epoch covers every example once
        for e in a.items(g // 2, g % 2):
            seen[id(e)] += 1
    assert len(seen) <= len(ex) and max(seen.values()) == 1
    pairs = [EncodedPair(e, Encoded(e.ids[:-1] + [5], e.mask), {}) for e in ex]
    pb = PairBatches(pairs, 4, seed=1, micro_per_step=1)
    first = [pb.batch(s, 0)["index"] for s in range(10)]
    assert sorted(torch.cat(first).tolist()) == list(range(40))  # an epoch is a permutation


# -------------------------------------------------------------------------- reward model

def test_reward_model_matches_transformers_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    rm = RewardModel.from_backbone(Transformer(tiny_config()))
    rm.config.extra["pad_token_id"] = 2  # transformers finds each row's last token by it
    rm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == 2
    ids = torch.randint(3, 512, (3, 12))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[:, 0]
        ours = rm.eval()(ids)
        back = RewardModel.from_pretrained(str(tmp_path))(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours, back)


def test_reward_model_padding_either_side_changes_nothing():
    torch.manual_seed(5)
    rm = RewardModel.from_backbone(Transformer(tiny_config())).eval()
    seqs = [torch.randint(3, 512, (n,)) for n in (7, 12, 3)]
    alone = torch.cat([rm(s[None]) for s in seqs])
    right = torch.full((3, 12), 2)
    left = torch.full((3, 12), 2)
    rmask = torch.zeros(3, 12, dtype=torch.long)
    lmask = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, :len(s)], rmask[i, :len(s)] = s, 1
        left[i, 12 - len(s):], lmask[i, 12 - len(s):] = s, 1
    torch.testing.assert_close(rm(right, rmask), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm(left, lmask), alone, atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 7, 19, 22], dtype=torch.int32)
    torch.testing.assert_close(rm(torch.cat(seqs)[None], cu_seqlens=cu), alone, atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="at least one real token"):
        rm(right, torch.zeros_like(rmask))
    with pytest.raises(TypeError, match="no KV cache"):
        rm.new_cache(1)


def test_reward_and_language_model_directories_are_not_confused(tmp_path, model_dir):
    torch.manual_seed(6)
    base = Transformer.from_pretrained(str(model_dir))
    rm = RewardModel.from_backbone(base)
    for (n, p), (n2, p2) in zip(rm.named_parameters(), base.named_parameters(), strict=False):
        if n == n2:
            assert torch.equal(p, p2)  # the decoder is the language model's
    assert not any(n.startswith("lm_head") for n in rm.state_dict())
    rm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="is a reward model.*RewardModel.from_pretrained"):
        Transformer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel.from_pretrained(str(model_dir))


# --------------------------------------------------------------- reference log-probs

def _pairs(tok, n=10):
    r = Renderer(tok, 64)
    return [r.pair(Row("x", d)) for d in pair_rows(n, 7)]


def test_cached_reference_logprobs_equal_live(tok, tmp_path):
    torch.manual_seed(7)
    model = Transformer(tiny_config()).eval()
    pairs = _pairs(tok)
    path = tmp_path / "ref.safetensors"
    first, hit = load_or_compute(path, lambda: reference_logprobs(model, pairs, batch_size=3))
    again, hit2 = load_or_compute(path, lambda: pytest.fail("recomputed"))
    assert not hit and hit2
    for k in first:
        assert torch.equal(first[k], again[k])
    with torch.no_grad():
        for i in range(len(pairs)):  # each pair alone, live
            sums, counts = pair_logprobs(model, pair_batch(pairs, [i]))
            torch.testing.assert_close(first["chosen"][i], sums[0], atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(first["rejected"][i], sums[1], atol=1e-5, rtol=1e-6)
            assert first["chosen_tokens"][i] == counts[0]
    path.write_bytes(b"garbage")  # a damaged cache entry is recomputed, not trusted
    third, hit3 = load_or_compute(path, lambda: reference_logprobs(model, pairs, batch_size=5))
    assert not hit3 and torch.allclose(third["chosen"], first["chosen"], atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "hinge", "robust"])
def test_dpo_loss_is_ln2_at_initialisation(tok, loss_type):
    torch.manual_seed(8)
    model = Transformer(tiny_config())
    ref = Transformer(tiny_config())
    ref.load_state_dict(model.state_dict())
    pairs = _pairs(tok, 6)
    cfg = apply(TrainConfig(), {"loss_type": loss_type, "beta": 0.2}).validate()
    batch = pair_batch(pairs, list(range(6)))
    loss, metrics = dpo.make_step_fn(cfg, ref.eval())(model, batch)
    expected = {"dpo": math.log(2), "robust": math.log(2), "hinge": 1.0,
                "ipo": (1 / (2 * 0.2)) ** 2}[loss_type]
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    if loss_type == "dpo":
        assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()  # exactly
    assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0
    # the same with cached reference log-probs
    cached = reference_logprobs(ref, pairs, batch_size=4)
    batch = dpo.WithReference(PairBatches(pairs, 6, 0, 1, shuffle=False), cached).batch(0, 0)
    loss2, _ = dpo.make_step_fn(cfg)(model, batch)
    assert loss2.item() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------ recipe runs

def test_sft_run_improves_held_out_answer_loss(model_dir, sft_data, cache, tmp_path):
    res = sft.run(post_cfg(model_dir, sft_data, "sft"), tmp_path)
    val = val_rows(tmp_path)
    assert [r["step"] for r in val] == [0, 30]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0, val
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["before"]["val_loss"] == val[0]["val_loss"] and s["after"] == res["val"]
    assert s["data"]["train"] == 160 and s["packing"]["fill"] > 0.5
    model = Transformer.from_pretrained(str(tmp_path / "final"))  # a plain model again
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    ids = torch.tensor([Renderer(load_tokenizer(tmp_path / "final"), 64).prompt_ids("Hi")])
    assert model(ids).shape == (1, ids.shape[1], 512)


def test_reward_run_learns_to_rank_held_out_pairs(model_dir, pair_data, cache, tmp_path):
    reward.run(post_cfg(model_dir, pair_data, "reward", lr=1e-3), tmp_path)
    val = val_rows(tmp_path)
    assert val[-1]["val_accuracy"] >= 0.9 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert set(k for k in val[-1] if k.startswith("val_accuracy/")) == {
        "val_accuracy/polarity", "val_accuracy/tone"}
    rows = train_rows(tmp_path)
    assert {"accuracy", "rewards/chosen", "rewards/margins"} <= set(rows[-1])
    rm = RewardModel.from_pretrained(str(tmp_path / "final"))  # loads back as a reward model
    tok = load_tokenizer(tmp_path / "final")
    r = Renderer(tok, 64)
    good = r.pair(Row("x", {"prompt": "Tell me about tiger.", "chosen": "The tiger is good "
                                "and kind.", "rejected": "The tiger is bad and cruel."}))
    rc, rr = reward.score_pairs(rm, [good], 1)
    assert rc.item() > rr.item()


@pytest.mark.parametrize("loss_type, over", [
    ("dpo", {}), ("dpo", {"label_smoothing": 0.1, "ref_cache": False}), ("ipo", {}),
    ("hinge", {}), ("robust", {"label_smoothing": 0.1}), ("slic", {})])
def test_preference_runs_improve_held_out_preference(model_dir, pair_data, cache, tmp_path,
                                                     loss_type, over):
    dpo.run(post_cfg(model_dir, pair_data, "dpo", loss_type=loss_type, steps=20, **over),
            tmp_path)
    val = val_rows(tmp_path)
    before, after = val[0], val[-1]
    assert after["val_loss"] < before["val_loss"], (before, after)
    assert after["val_logps/accuracies"] >= 0.9, after
    if loss_type != "slic":
        assert before["val_rewards/accuracies"] == 0.0 and after["val_rewards/accuracies"] >= 0.9
        assert before["val_loss"] == pytest.approx(
            {"dpo": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 25.0}[loss_type],
            abs=1e-4)
    first = train_rows(tmp_path)[0]
    names = {"logps/chosen", "logps/rejected"} | (
        {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
        if loss_type != "slic" else {"logps/accuracies"})
    assert names <= set(first)
    s = json.loads((tmp_path / "summary.json").read_text())
    if loss_type != "slic" and over.get("ref_cache", True):
        assert Path(s["ref_cache_train"]["path"]).is_file()


def test_preference_run_reuses_the_reference_cache(model_dir, pair_data, cache, tmp_path):
    cfg = post_cfg(model_dir, pair_data, "dpo", steps=2, eval_before=False)
    dpo.run(cfg, tmp_path / "a")
    dpo.run(cfg, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["ref_cache_train"]["hit"] and b["ref_cache_val"]["hit"]
    assert a["ref_cache_train"]["path"] == b["ref_cache_train"]["path"]
    assert train_rows(tmp_path / "a") == [
        {**r, "tokens_per_s": a_r["tokens_per_s"]} for r, a_r in
        zip(train_rows(tmp_path / "b"), train_rows(tmp_path / "a"), strict=True)]


def test_sft_resume_is_bitwise_identical(model_dir, sft_data, cache, tmp_path):
    cfg = post_cfg(model_dir, sft_data, "sft", steps=6, eval_before=False)
    sft.run(cfg, tmp_path / "full")
    sft.run(cfg, tmp_path / "cut", stop_at=3)
    sft.run(cfg, tmp_path / "cut", resume=True)

    def curve(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in train_rows(run)]
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")


def test_starts_from_a_transformers_checkpoint(tmp_path, tok_dir, sft_data, cache):
    transformers = pytest.importorskip("transformers")
    conf = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(9)
    hf = transformers.Qwen2ForCausalLM(conf)
    hf.save_pretrained(str(tmp_path / "qwen"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, tmp_path / "qwen" / name)
    sft.run(post_cfg(tmp_path / "qwen", sft_data, "sft", steps=4, lr=1e-3), tmp_path / "run")
    val = val_rows(tmp_path / "run")
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    ids = torch.randint(0, 512, (1, 9))
    ours = Transformer.from_pretrained(str(tmp_path / "run" / "final"))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), back(ids).logits, atol=1e-4, rtol=1e-4)


def test_ddp_preference_run_equals_one_rank_with_accumulation(model_dir, pair_data, cache,
                                                              tmp_path):
    base = {"recipe": "dpo", "init_from": str(model_dir), "data": str(pair_data), "steps": 4,
            "batch_size": 2, "seq_len": 64, "lr": 3e-3, "warmup": 1, "eval_every": 0,
            "progress": False, "tensorboard": False, "seed": 3}
    # fill the reference cache once here, so both runs read the same numbers
    dpo.run(apply(TrainConfig(), {**base, "steps": 1, "warmup": 0}).validate(), tmp_path / "w")
    env = {**os.environ, "LLMCORE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    for n, accum, name in ((1, 2, "one"), (2, 1, "two")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", str(ROOT / "tests" / "programs" / "train_dist.py"),
               str(tmp_path / name), json.dumps({**base, "grad_accum": accum})]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def curve(run):
        return [(r["step"], r["loss"], r["grad_norm"], r["tokens"]) for r in train_rows(run)]
    assert curve(tmp_path / "two") == curve(tmp_path / "one")


@pytest.mark.parametrize("recipe, over", [
    ("sft", {"bfp": "mxint8"}), ("reward", {"bfp": "mxint8"}), ("dpo", {"dtype": "bfloat16"}),
    ("sft", {"packing": False, "dtype": "bfloat16"})])
def test_recipes_train_with_bfp_linears_and_bf16(model_dir, sft_data, pair_data, cache,
                                                 tmp_path, recipe, over):
    mod = {"sft": sft, "reward": reward, "dpo": dpo}[recipe]
    data = sft_data if recipe == "sft" else pair_data
    mod.run(post_cfg(model_dir, data, recipe, steps=4, eval_before=False, **over), tmp_path)
    rows = train_rows(tmp_path)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    if recipe == "reward":  # the head stays in float; the saved model is a plain reward model
        RewardModel.from_pretrained(str(tmp_path / "final"))


# ------------------------------------------------------------------------------------ ppo

def ppo_cfg(model_dir: Path, data: Path, **over) -> TrainConfig:
    values = {"recipe": "ppo", "init_from": str(model_dir), "data": str(data), "steps": 48,
              "batch_size": 8, "seq_len": 64, "lr": 3e-3, "min_lr": 3e-3, "warmup": 0,
              "schedule": "constant", "eval_every": 0, "progress": False, "tensorboard": False,
              "seed": 1, "ppo": {"rollout_batch": 16, "ppo_epochs": 4, "max_new_tokens": 8,
                                 "temperature": 1.0, "rm_weight": 0.0}}
    values.update(over)
    return apply(TrainConfig(), values).validate()


def _longer(prompts, answers):
    """A toy verifiable reward: the answer's length in characters, up to 24 (the SFT model
    below ends its answers after a few tokens; PPO must learn to postpone the EOS)."""
    return [min(len(a), 24) / 24 for a in answers]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, model_dir, sft_data, cache) -> Path:
    """The tiny model after a short SFT: it answers with words of the task."""
    out = tmp_path_factory.mktemp("sft-model")
    sft.run(post_cfg(model_dir, sft_data, "sft", steps=40, eval_before=False), out)
    return out / "final"


def test_ppo_raises_a_verifiable_reward_with_bounded_kl(sft_model, sft_data, cache, tmp_path):
    from llmcore.training.recipes import ppo

    ppo.run(ppo_cfg(sft_model, sft_data, steps=160, lr=1e-3, min_lr=1e-3), tmp_path,
            reward_fn=_longer)
    rows = train_rows(tmp_path)
    scores = [r["objective/scores"] for r in rows[::8]]  # one rollout every 8 steps
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert rows[0]["policy/clipfrac"] == 0.0 and rows[0]["policy/approxkl"] < 1e-10
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1, scores  # measured: 0.47 -> 0.64
    assert all(abs(r["objective/kl"]) < 20 for r in rows)
    names = {"objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
             "objective/non_score_reward", "policy/approxkl", "policy/clipfrac",
             "loss/policy", "loss/value", "val/clipfrac", "rollout/parse_rate"}
    assert names <= set(rows[0])
    final = tmp_path / "final"
    Transformer.from_pretrained(str(final))  # the policy is a plain model directory
    assert (final / "value_head.safetensors").is_file()


def test_ppo_resume_is_bitwise_identical(model_dir, sft_data, cache, tmp_path):
    from llmcore.training.recipes import ppo

    cfg = ppo_cfg(model_dir, sft_data, steps=16, save_every=8)
    ppo.run(cfg, tmp_path / "full", reward_fn=_longer)
    ppo.run(cfg, tmp_path / "cut", stop_at=8, reward_fn=_longer)
    ppo.run(cfg, tmp_path / "cut", resume=True, reward_fn=_longer)

    def curve(run):
        return [(r["step"], r["loss"], r["objective/scores"]) for r in train_rows(run)]
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")


@pytest.mark.parametrize("over, match", [
    ({"ppo": {"rollout_batch": 0}}, "ppo.rollout_batch"),
    ({"ppo": {"kl_estimator": "k2"}}, "ppo.kl_estimator"),
    ({"ppo": {"bogus": 1}}, "unknown ppo setting"),
    ({"ppo": {"rm_weight": 1.0}}, "ppo.reward_model' is needed"),
    ({"grad_accum": 2}, "grad_accum"),
    ({"save_every": 3}, "multiple of the steps per rollout"),
    ({"seq_len": 8}, "no room for prompts"),
])
def test_ppo_settings_are_checked(model_dir, sft_data, cache, tmp_path, over, match):
    from llmcore.training.recipes import ppo

    values = {"ppo": {"max_new_tokens": 8, "rm_weight": 0.0, **over.pop("ppo", {})}, **over}
    cfg = ppo_cfg(model_dir, sft_data, **values)
    with pytest.raises(ValueError, match=match):
        ppo.run(cfg, tmp_path, reward_fn=None if "reward_model" in match else _longer)
