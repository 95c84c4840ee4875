"""Distillation data (`llmcore data distill`): a target's greedy continuations of
training-split prompts, as token shards the pretrain recipe trains a draft on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llmcore.cli import main
from llmcore.data import corpus as C
from llmcore.data.prepare import ensure_shards
from llmcore.data.shards import TokenShards
from llmcore.generation import generate
from llmcore.models import Transformer, TransformerConfig
from llmcore.tokenizer import load_tokenizer, train_tokenizer
from llmcore.training.config import TrainConfig
from llmcore.training.distill import document_spans, write_distill_shards
from llmcore.training.recipes.pretrain import WindowBatches, counted_tokens

VF = 0.2  # the target run's val_fraction
SMALL = {"prompts": 7, "prompt_tokens": 12, "new_tokens": 9, "batch_size": 3,
         "val_prompts": 2, "progress": False}


@pytest.fixture(scope="module")
def target(corpus, tmp_path_factory) -> Path:
    """RUN/final of a tiny random model with a 400-token BPE, its run config beside it."""
    run = tmp_path_factory.mktemp("target-run")
    tok = train_tokenizer((d.text for d in C.iter_documents([str(corpus)], "train", VF)), 400,
                          run / "tok", show_progress=False)
    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("tiny", vocab_size=400, dim=32, ffn_dim=64,
                                      max_seq_len=256)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # spread logits: no near-ties in the greedy choice
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    final = run / "final"
    model.save_pretrained(str(final))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tok) / f, final / f)
    (run / "config.json").write_text(json.dumps(
        {"recipe": "pretrain", "data": [str(corpus)], "val_fraction": VF}))
    return final


def test_writes_the_targets_greedy_tokens(target, cache, tmp_path):
    out = tmp_path / "distill"
    h = write_distill_shards(target, out, **SMALL)
    assert h["dtype"] == "uint16" and h["eos_id"] == 1 and h["val_fraction"] == VF
    model = Transformer.from_pretrained(str(target)).eval()
    tok = load_tokenizer(target)
    sh = TokenShards(out)
    n_doc = 12 + 9 + 1
    for split, n in (("train", 5), ("val", 2)):
        assert h["splits"][split]["documents"] == n
        toks = sh.tokens(split).to(torch.int64).view(n, n_doc)
        assert (toks[:, -1] == 1).all()  # each document ends with EOS
        for row in toks:  # generated in batches of 3; checked one prompt at a time
            want = generate(model, row[None, :12], 9)[0]
            assert torch.equal(row[:-1], want)
        assert h["splits"][split]["bytes"] == sum(
            len(tok.decode(r[:-1].tolist()).encode()) for r in toks)
    mtime = os.stat(out / "train.bin").st_mtime_ns
    assert write_distill_shards(target, out, **SMALL) == h  # the same content: skipped
    assert os.stat(out / "train.bin").st_mtime_ns == mtime


def _windows(tokens: torch.Tensor, n: int) -> set[tuple[int, ...]]:
    return {tuple(w) for w in tokens.to(torch.int64).unfold(0, n, 1).tolist()}


def test_prompts_come_from_the_train_split_only(target, corpus, cache, tmp_path):
    # Data whose held-out files hold text no training file has: a prompt drawn from them
    # would show.
    data = tmp_path / "data"
    data.mkdir()
    code = [d.text for d in C.iter_documents([str(corpus)], "train", VF)]
    n_val = 0
    for i in range(24):
        name = f"f{i}.py"
        held = C.split_of(name, VF) == "val"
        (data / name).write_text("@~" * 400 if held else code[i])
        n_val += held
    assert 0 < n_val < 24
    h = write_distill_shards(target, tmp_path / "d", data=[str(data)], **SMALL)
    src = TokenShards(ensure_shards([str(data)], target, VF, progress=False))
    assert h["distill"]["source_shards"] == str(src.path)
    train, held_out = _windows(src.tokens("train"), 12), _windows(src.tokens("val"), 12)
    assert not train & held_out
    sh = TokenShards(tmp_path / "d")
    rows = {s: sh.tokens(s).to(torch.int64).view(-1, 22)[:, :12].tolist()
            for s in ("train", "val")}
    assert all(tuple(p) in train for r in rows.values() for p in r)
    # train and val prompts come from different documents
    spans = document_spans(src.tokens("train"), src.eos_id).tolist()
    toks = src.tokens("train").to(torch.int64)
    doc_of: dict[tuple[int, ...], set[int]] = {}
    for i, (s, n) in enumerate(spans):
        for w in _windows(toks[s:s + n], 12) if n >= 12 else ():
            doc_of.setdefault(w, set()).add(i)
    docs = {s: {min(doc_of[tuple(p)]) for p in r if len(doc_of[tuple(p)]) == 1}
            for s, r in rows.items()}  # prompts whose window is in one document only
    assert docs["train"] and docs["val"] and not docs["train"] & docs["val"]
    with pytest.raises(ValueError, match=r"val_fraction 0.1 is below the target run's 0.2"):
        write_distill_shards(target, tmp_path / "x", val_fraction=0.1, **SMALL)


def test_quantized_target(target, cache, tmp_path):
    kw = {**SMALL, "prompts": 2, "val_prompts": 0}
    h = write_distill_shards(target, tmp_path / "q", quantize="mxint8", **kw)
    assert h["distill"]["quantize"] == "mxint8"
    model = Transformer.from_pretrained(str(target), quantize="mxint8").eval()
    for row in TokenShards(tmp_path / "q").tokens("train").to(torch.int64).view(2, 22):
        assert torch.equal(row[:-1], generate(model, row[None, :12], 9)[0])


@pytest.mark.parametrize("kw, msg", [
    ({"prompts": 0}, "prompts must be an int >= 1"),
    ({"prompt_tokens": 0}, "prompt_tokens must be an int >= 1"),
    ({"new_tokens": -1}, "new_tokens must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"val_prompts": 7}, r"val_prompts must be an int in \[0, prompts = 7\)"),
    ({"quantize": "int3"}, "quantize must be"),
    ({"prompt_tokens": 200, "new_tokens": 100}, "longer than the model's max_seq_len 256"),
    ({"prompt_tokens": 100_000}, "no training document"),
])
def test_bad_arguments_name_the_argument(target, cache, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        write_distill_shards(target, tmp_path / "d", **{**SMALL, **kw})
    assert not (tmp_path / "d" / "header.json").exists()


def test_missing_model_files(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        write_distill_shards(tmp_path, tmp_path / "d", **SMALL)
    shutil.copytree(target, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        write_distill_shards(tmp_path / "m", tmp_path / "d", **SMALL)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, msg", [
    (["--prompt-tokens", "200", "--new-tokens", "100"], "--prompt-tokens + --new-tokens = 300"),
    (["--val-fraction", "0.1"], "--val-fraction 0.1 is below the target run's 0.2"),
    (["--val-prompts", "9", "--prompts", "9"], "--val-prompts must be an int in [0, --prompts"),
])
def test_cli_errors_are_one_line_naming_the_flag(target, cache, tmp_path, capsys, argv, msg):
    rc, _, err = _cli(capsys, "data", "distill", "--model", target, "--out", tmp_path / "d",
                      *argv)
    assert rc == 2 and err.count("\n") == 1 and msg in err, err


def _repo_status() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root,
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def test_cli_then_train_a_draft_on_it(target, cache, tmp_path, capsys, monkeypatch):
    """The command writes only its --out (and the cache); pretrain reads the result,
    starting from a model of the same shape; another tokenizer is refused."""
    before = _repo_status()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "distill"
    rc, text, _ = _cli(capsys, "data", "distill", "--model", target, "--out", out,
                       "--prompts", "12", "--prompt-tokens", "16", "--new-tokens", "8",
                       "--batch-size", "5", "--val-prompts", "2")
    assert rc == 0 and "train: 10 prompts, 250 tokens" in text and "val: 2 prompts" in text
    assert sorted(os.listdir(tmp_path)) == ["distill"]
    assert _repo_status() == before
    sets = {"shards": str(out), "tokenizer": str(target), "init_from": str(target),
            "steps": 2, "warmup": 0, "seq_len": 16, "batch_size": 2, "progress": False,
            "sample_tokens": 0, "model.dim": 32, "model.ffn_dim": 64, "val_fraction": VF}
    argv = [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    rc, text, err = _cli(capsys, "train", "pretrain", *argv, "--out", tmp_path / "run")
    assert rc == 0 and "done:" in text, err
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    rc, text, err = _cli(capsys, "train", "pretrain", *argv, "--set", 'loss_on="generated"',
                         "--out", tmp_path / "run-generated")
    assert rc == 0 and "done:" in text, err
    other = train_tokenizer(["def f(x):\n    return x\n" * 50], 300, tmp_path / "tok2",
                            show_progress=False)
    argv[argv.index(f"tokenizer={json.dumps(str(target))}")] = \
        f"tokenizer={json.dumps(str(other))}"
    rc, _, err = _cli(capsys, "train", "pretrain", *argv, "--out", tmp_path / "run2")
    assert rc == 2 and "another tokenizer" in err, err


def test_loss_on_generated_counts_only_the_continuations(target, corpus, cache, tmp_path):
    write_distill_shards(target, tmp_path / "d", **SMALL)
    sh = TokenShards(tmp_path / "d")
    cfg = TrainConfig(loss_on="generated").validate()
    assert counted_tokens(cfg, sh) == (12, 9)
    assert counted_tokens(TrainConfig(), sh) is None
    b = WindowBatches(sh, 4, 30, seed=3, counted=(12, 9)).batch(0, 0)
    plain = WindowBatches(sh, 4, 30, seed=3).batch(0, 0)
    assert torch.equal(b["input_ids"], plain["input_ids"])
    toks = sh.tokens("train").to(torch.int64)
    for x, y, y0 in zip(b["input_ids"], b["labels"], plain["labels"], strict=True):
        start = next(s for s in range(toks.numel() - 30) if torch.equal(toks[s:s + 30], x))
        pos = (torch.arange(start + 1, start + 31)) % 22  # each label's place in its document
        keep = (pos >= 12) & (pos < 21)
        assert torch.equal(y[keep], y0[keep]) and (y[~keep] == -100).all()
    plain_shards = TokenShards(ensure_shards([str(corpus)], target, VF, progress=False))
    with pytest.raises(ValueError, match="needs distillation shards"):
        counted_tokens(cfg, plain_shards)
    with pytest.raises(ValueError, match="config key 'loss_on' must be one of"):
        TrainConfig(loss_on="prompt").validate()
    with pytest.raises(ValueError, match="config key 'loss_on' must be 'all' with"):
        TrainConfig(loss_on="generated", domain_weights="uniform").validate()


def test_a_run_saved_before_loss_on_existed_still_resumes(tmp_path):
    from llmcore.training.loop import TrainingError, resume_compatible

    old = TrainConfig().to_dict()
    del old["loss_on"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    resume_compatible(tmp_path, TrainConfig())  # the missing key reads as its default
    with pytest.raises(TrainingError, match="config keys differ from the saved run: loss_on"):
        resume_compatible(tmp_path, TrainConfig(loss_on="generated"))
