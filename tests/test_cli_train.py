"""The training commands end to end: tokenizer, shards, train, resume, eval, plot."""

from __future__ import annotations

import json

import pytest

from llmcore.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tokenizer_data_train_eval_plot(corpus, cache, tmp_path, capsys):
    tok, shards, run = tmp_path / "tok", tmp_path / "shards", tmp_path / "run"
    rc, out, _ = run_cli(capsys, "tokenizer", "train", "--data", str(corpus), "--vocab-size",
                         "400", "--val-fraction", "0.2", "--out", str(tok))
    assert rc == 0 and (tok / "tokenizer.json").is_file()
    rc, out, _ = run_cli(capsys, "data", "prepare", "--data", str(corpus), "--tokenizer",
                         str(tok), "--val-fraction", "0.2", "--out", str(shards))
    assert rc == 0 and "val:" in out and (shards / "header.json").is_file()
    sets = ["--set", f"tokenizer={json.dumps(str(tok))}", "--set",
            f"shards={json.dumps(str(shards))}", "--set", "val_fraction=0.2",
            "--set", "steps=6", "--set", "warmup=1", "--set", "seq_len=32",
            "--set", "batch_size=2", "--set", "progress=false", "--set", "sample_tokens=0",
            "--set", "model.dim=32", "--set", "model.ffn_dim=64"]
    rc, out, _ = run_cli(capsys, "train", "pretrain", *sets, "--out", str(run))
    assert rc == 0 and "done:" in out and "val_bpb" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["steps"] == 6 and cfg["model"]["dim"] == 32
    try:
        import tensorboardX  # noqa: F401

        assert any((run / "tensorboard").iterdir())  # event files when the writer exists
    except ImportError:
        assert not (run / "tensorboard").exists()
    rc, out, _ = run_cli(capsys, "eval", "perplexity", "--model", str(run / "final"), "--data",
                         str(corpus), "--val-fraction", "0.2", "--seq-len", "32",
                         "--json", str(tmp_path / "ev.json"))
    assert rc == 0 and "bits/byte" in out and "xz -9e" in out
    ev = json.loads((tmp_path / "ev.json").read_text())
    last_val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert ev["bpb"] == pytest.approx(last_val["val_bpb"], rel=1e-5)
    assert ev["tokens"] == last_val["val_tokens"] and ev["xz_bpb"] > 0
    pytest.importorskip("matplotlib")
    rc, out, _ = run_cli(capsys, "plot", str(run))
    assert rc == 0 and (run / "plots" / "loss.png").is_file()


@pytest.mark.parametrize("argv, msg", [
    (["train", "pretrain", "--set", "stepz=3"], "unknown config key 'stepz'"),
    (["train", "pretrain", "--config", "nope.toml"], "neither a file nor a named config"),
    (["train", "pretrain", "--resume"], "--resume needs --out"),
    (["train", "pretrain", "--data", "/does/not/exist", "--out", "{tmp}/r"], "does not exist"),
    (["eval", "perplexity", "--model", "{tmp}/none"], "is not a directory"),
    (["plot", "{tmp}"], "metrics.jsonl not found"),
    (["train", "pretrain", "--out", "{tmp}", "--resume"], "no complete checkpoint"),
])
def test_training_commands_fail_with_one_line(argv, msg, cache, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and msg in err, err


def test_list_configs(capsys):
    rc, out, _ = run_cli(capsys, "train", "pretrain", "--list-configs")
    assert rc == 0 and "stdlib" in json.loads(out)
