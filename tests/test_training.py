"""The training loop: learning, exact resume, atomic checkpoints, distributed equivalence,
BFP training, evaluation arithmetic, export to transformers, and config errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore.training import checkpoint as ckpt
from llmcore.training.config import TrainConfig, apply, load_config
from llmcore.training.recipes import pretrain

ROOT = Path(__file__).resolve().parents[1]


def tiny_values(corpus: Path, **over) -> dict:
    values = {"data": [str(corpus)], "val_fraction": 0.2, "vocab_size": 512, "preset": "tiny", "steps": 12,
              "batch_size": 4, "seq_len": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup": 2,
              "eval_every": 0, "eval_tokens": 2048, "sample_tokens": 0, "progress": False,
              "tensorboard": False, "seed": 7,
              "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                        "ffn_dim": 128, "max_seq_len": 128}}
    values.update(over)
    return values


def tiny_cfg(corpus: Path, **over) -> TrainConfig:
    return apply(TrainConfig(), tiny_values(corpus, **over)).validate()


def read_rows(run: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("split") == split]


def curve(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_rows(run)]


def test_loss_decreases_on_stdlib(corpus, cache, tmp_path):
    res = pretrain.run(tiny_cfg(corpus, steps=40, eval_every=20, sample_tokens=8), tmp_path)
    losses = [r["loss"] for r in read_rows(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    val = read_rows(tmp_path, "val")
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert res["val"]["val_bpb"] == val[-1]["val_bpb"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val"]["val_bpb"] == val[-1]["val_bpb"] and summary["steps"] == 40
    assert summary["xz_9e"]["bpb"] > 0 and summary["params"] > 0
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 2
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["steps"] == 40 and cfg["vocab_size"] == 512


def test_resume_is_bitwise_identical(corpus, cache, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain.run(tiny_cfg(corpus, save_every=4), full)
    pretrain.run(tiny_cfg(corpus, save_every=4), cut, stop_at=6)
    assert [p.name for p in ckpt.list_checkpoints(cut)] == ["step_4", "step_6"]
    assert len(read_rows(cut)) == 6
    pretrain.run(tiny_cfg(corpus, save_every=4), cut, resume=True)
    assert curve(cut) == curve(full)  # exact float equality of every logged value
    a = ckpt.load_file(str(full / "final" / "model.safetensors"))
    b = ckpt.load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(corpus, cache, tmp_path):
    pretrain.run(tiny_cfg(corpus, steps=4), tmp_path, stop_at=2)
    with pytest.raises(RuntimeError, match="config keys differ.*lr"):
        pretrain.run(tiny_cfg(corpus, steps=4, lr=1e-3), tmp_path, resume=True)


def test_a_new_run_never_overwrites_an_old_one(corpus, cache, tmp_path):
    pretrain.run(tiny_cfg(corpus, steps=2, warmup=1), tmp_path / "run")
    before = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="already holds a training run.*--resume"):
        pretrain.run(tiny_cfg(corpus, steps=2, warmup=1), tmp_path / "run")
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == before
    with pytest.raises(RuntimeError, match="no complete checkpoint"):
        pretrain.run(tiny_cfg(corpus, steps=2, warmup=1), tmp_path / "empty", resume=True)


def test_crash_mid_checkpoint_keeps_the_previous_one(corpus, cache, tmp_path, monkeypatch):
    pretrain.run(tiny_cfg(corpus, steps=8, save_every=4), tmp_path, stop_at=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_4").iterdir()}
    real = ckpt.save_file

    def dies_on_rng(tensors, filename, *a, **k):
        if filename.endswith("rng.safetensors"):  # after model and optimizer are written
            raise OSError("disk full (injected)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", dies_on_rng)
    with pytest.raises(OSError, match="injected"):
        pretrain.run(tiny_cfg(corpus, steps=8, save_every=4), tmp_path, resume=True)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_4"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_4").iterdir()}
    assert after == before
    model = pretrain.build_model(tiny_cfg(corpus, steps=8), 512)
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_4", model, restore_rng=False)
    assert state["step"] == 4


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ck"
    with ckpt.atomic_directory(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), ckpt.atomic_directory(target) as d:
        (d / "a").write_text("2")
        raise RuntimeError("crash")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def _torchrun(nproc: int, out: Path, values: dict, cache: Path, extra: str | None = None
              ) -> None:
    env = {**os.environ, "LLMCORE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "tests" / "programs" / "train_dist.py"),
           str(out), json.dumps(values), *([extra] if extra else [])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_rank_with_double_accumulation(corpus, cache, tmp_path):
    # prepare the tokenizer and shards once in this process, so the ranks share them
    pretrain.run(tiny_cfg(corpus, steps=1, warmup=0), tmp_path / "warm")
    one = tiny_values(corpus, steps=6, grad_accum=2)
    two = tiny_values(corpus, steps=6, grad_accum=1, parallel="ddp")
    _torchrun(1, tmp_path / "one", one, cache)
    _torchrun(2, tmp_path / "two", two, cache)
    assert curve(tmp_path / "two") == curve(tmp_path / "one")


@pytest.mark.slow
def test_fsdp2_trains_and_its_checkpoint_loads_in_one_process(corpus, cache, tmp_path):
    pretrain.run(tiny_cfg(corpus, steps=1, warmup=0), tmp_path / "warm")
    values = tiny_values(corpus, steps=6, parallel="fsdp", save_every=3)
    _torchrun(2, tmp_path / "fsdp", values, cache)
    rows = read_rows(tmp_path / "fsdp")
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    step = tmp_path / "fsdp" / "checkpoints" / "step_6"
    assert (step / "dcp").is_dir()
    from llmcore.models import Transformer

    model = Transformer.from_pretrained(str(tmp_path / "fsdp" / "final"))
    ref = pretrain.build_model(tiny_cfg(corpus), model.config.vocab_size)
    ckpt.load_model_weights(ref, step)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(model(ids), ref.eval()(ids))
    # the sharded (DCP) checkpoint resumes exactly: stop at 3, resume to 6
    _torchrun(2, tmp_path / "cut", values, cache, "3")
    assert (tmp_path / "cut" / "checkpoints" / "step_3" / "dcp").is_dir()
    _torchrun(2, tmp_path / "cut", values, cache, "resume")
    assert curve(tmp_path / "cut") == curve(tmp_path / "fsdp")


def test_bf16_autocast_trains(corpus, cache, tmp_path):
    pretrain.run(tiny_cfg(corpus, steps=6, dtype="bfloat16"), tmp_path)
    losses = [r["loss"] for r in read_rows(tmp_path)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_bfp_training_tracks_fp32(corpus, cache, tmp_path):
    steps = 30
    fp = pretrain.run(tiny_cfg(corpus, steps=steps), tmp_path / "fp32")
    bfp = pretrain.run(tiny_cfg(corpus, steps=steps, bfp="mxint8"), tmp_path / "bfp")
    a, b = fp["val"]["val_loss"], bfp["val"]["val_loss"]
    assert abs(b - a) / a < 0.02, (a, b)  # the documented margin: within 2% at equal steps
    la = [r["loss"] for r in read_rows(tmp_path / "fp32")]
    lb = [r["loss"] for r in read_rows(tmp_path / "bfp")]
    assert la != lb  # the BFP run really ran through quantised GEMMs
    from llmcore.models import Transformer

    exported = Transformer.from_pretrained(str(tmp_path / "bfp" / "final"))
    assert all(type(m).__name__ != "BFPLinear" for m in exported.modules())


def _hand_shards(path: Path, tokens: list[int], n_bytes: int, vocab: int) -> None:
    import array

    path.mkdir()
    for split in ("train", "val"):
        (path / f"{split}.bin").write_bytes(array.array("H", tokens).tobytes())
    info = {"tokens": len(tokens), "documents": 1, "bytes": n_bytes}
    (path / "header.json").write_text(json.dumps({
        "format": "llmcore-tokens", "version": 1, "dtype": "uint16", "vocab_size": vocab,
        "eos_id": 0, "tokenizer_sha256": "x", "content_sha256": "y",
        "splits": {"train": info, "val": info}}))


class _Fixed(torch.nn.Module):
    """A 'model' with fixed next-token probabilities p over a vocabulary of len(p)."""

    def __init__(self, p):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.log(torch.tensor(p, dtype=torch.float64)))

    def forward(self, ids):
        return self.logits.float().expand(*ids.shape, -1)


def test_perplexity_and_bits_per_byte_by_hand(tmp_path):
    from llmcore.data.shards import TokenShards
    from llmcore.evaluation import evaluate_split

    tokens = [0, 1, 1, 2, 1, 0, 1, 2, 2, 1, 1]  # 10 predicted tokens: 2x"0", 5x"1", 3x"2"
    p = [0.5, 0.25, 0.25]
    _hand_shards(tmp_path / "s", tokens, n_bytes=44, vocab=3)
    sh = TokenShards(tmp_path / "s")
    nll = -sum(math.log(p[t]) for t in tokens[1:])
    for seq_len, bs in ((3, 2), (4, 1), (16, 4)):
        r = evaluate_split(_Fixed(p), sh, "val", seq_len, bs)
        assert r["tokens"] == 10 and r["nll"] == pytest.approx(nll)
        assert r["loss"] == pytest.approx(nll / 10, rel=1e-6)
        assert r["ppl"] == pytest.approx(math.exp(nll / 10), rel=1e-6)
        # bytes of the 10 predicted tokens: 10 * 44 / 11
        assert r["bpb"] == pytest.approx(nll / 40 / math.log(2), rel=1e-6)
    # capped: ceil(5 / 4) = 2 windows of the 3 (starts 0, 4, 8), spread out: 0 and 4
    capped = evaluate_split(_Fixed(p), sh, "val", 4, 2, max_tokens=5)
    assert capped["tokens"] == 8
    assert capped["loss"] == pytest.approx(-sum(math.log(p[t]) for t in tokens[1:9]) / 8)
    spread = evaluate_split(_Fixed(p), sh, "val", 2, 1, max_tokens=4)  # starts 0, 2, 4, 6, 8
    picked = [1, 2, 5, 6]  # windows 0 and 4: predicted tokens 1-2 and 5-6
    assert spread["tokens"] == 4
    assert spread["loss"] == pytest.approx(-sum(math.log(p[tokens[i]]) for i in picked) / 4)


def test_xz_baseline_is_lzma_extreme():
    import lzma

    from llmcore.evaluation import xz_bits_per_byte

    texts = ["def f(x):\n    return x + 1\n" * 20, "import os\n" * 7]
    r = xz_bits_per_byte(texts)
    packed = sum(len(lzma.compress(t.encode(), preset=9 | lzma.PRESET_EXTREME)) for t in texts)
    assert r["compressed_bytes"] == packed
    assert r["bpb"] == pytest.approx(8 * packed / sum(len(t) for t in texts))


def test_saved_model_loads_in_transformers_with_the_same_logits(corpus, cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    pretrain.run(tiny_cfg(corpus, steps=3), tmp_path)
    from llmcore.models import Transformer

    ours = Transformer.from_pretrained(str(tmp_path / "final"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([tok("def main():\n    return 0\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"


@pytest.mark.parametrize("sets, match", [
    (["lrr=0.1"], "unknown config key 'lrr' \\(did you mean 'lr'\\?\\)"),
    (["lr=-1"], "'lr' must be a finite number >= 0"),
    (["lr=nan"], "'lr' must be a finite number"),
    (["steps=0"], "'steps' must be an int >= 1"),
    (["steps=1.5"], "'steps' must be an int"),
    (["schedule=linear"], "'schedule' must be one of"),
    (["bfp=mxint3"], "config key 'bfp'"),
    (["compile=yes"], "'compile' must be true or false"),
    (["warmup=50", "steps=10"], "'warmup' must be <= steps"),
    (["min_lr=1", "lr=0.1"], "'min_lr' must be <= lr"),
    (["bfp=mxint8", "backend=torch"], "'backend' must be 'llmcore' when bfp is set"),
    (["nokey"], "--set expects key=value"),
])
def test_bad_configs_name_the_key(sets, match):
    with pytest.raises(ValueError, match=match):
        load_config(TrainConfig(), None, pretrain.NAMED_CONFIGS, sets)


def test_config_files_and_named_configs(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 7\nwarmup = 2\nlr = 1\nschedule = "wsd"\n[model]\ndim = 32\n')
    cfg = load_config(TrainConfig(), str(f), pretrain.NAMED_CONFIGS,
                      ["model.n_layers=3", "data=['a', 'b']", "min_lr=0.5"])
    assert (cfg.steps, cfg.lr, cfg.schedule, cfg.min_lr) == (7, 1.0, "wsd", 0.5)
    assert cfg.model == {"dim": 32, "n_layers": 3} and cfg.data == ["a", "b"]
    assert load_config(TrainConfig(), "stdlib", pretrain.NAMED_CONFIGS).steps == \
        pretrain.NAMED_CONFIGS["stdlib"]["steps"]
    (tmp_path / "bad.toml").write_text("steps = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(TrainConfig(), str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match="neither a file nor a named config"):
        load_config(TrainConfig(), "nope", pretrain.NAMED_CONFIGS)


def test_missing_data_is_one_clear_error(cache, tmp_path):
    cfg = apply(TrainConfig(), {"data": [str(tmp_path / "nothing")]}).validate()
    with pytest.raises(FileNotFoundError, match="nothing does not exist"):
        pretrain.run(cfg, tmp_path / "run")


def test_model_override_errors(corpus):
    with pytest.raises(ValueError, match="config key 'model'"):
        pretrain.build_model(tiny_cfg(corpus, model={"dimm": 3}), 512)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        pretrain.build_model(tiny_cfg(corpus, seq_len=512), 512)


def test_sharded_evaluation_sums_to_the_whole(tmp_path):
    from llmcore.data.shards import TokenShards
    from llmcore.evaluation.perplexity import evaluate_split, summarize

    tokens = [0, 1, 1, 2, 1, 0, 1, 2, 2, 1, 1, 0, 2]
    _hand_shards(tmp_path / "s", tokens, n_bytes=39, vocab=3)
    sh, model = TokenShards(tmp_path / "s"), _Fixed([0.5, 0.3, 0.2])
    whole = evaluate_split(model, sh, "val", 3, 1)
    parts = [evaluate_split(model, sh, "val", 3, 1, rank=r, world_size=3) for r in range(3)]
    assert sum(p["tokens"] for p in parts) == whole["tokens"] == 12
    merged = summarize(sum(p["nll"] for p in parts), 12, sh.bytes_per_token("val"))
    assert merged["bpb"] == pytest.approx(whole["bpb"]) and merged["loss"] == pytest.approx(
        whole["loss"])


@pytest.mark.slow
def test_compiled_training_runs_and_exports(corpus, cache, tmp_path):
    """compile=true: the model trains under torch.compile (llmcore ops through their fake
    impls) and the exported model is the plain module's."""
    pretrain.run(tiny_cfg(corpus, steps=3, warmup=1, compile=True), tmp_path)
    losses = [r["loss"] for r in read_rows(tmp_path)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    from llmcore.models import Transformer

    model = Transformer.from_pretrained(str(tmp_path / "final"))
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
