"""The main job (`llmcore bench`) and the CLI: they run, write what they promise and fail
clearly on bad arguments."""

import importlib
import json
import math
import os
import pkgutil
import shutil
import subprocess
import sys

import pytest
import torch

from llmcore import cli
from llmcore.bench import attention as attention_suite
from llmcore.bench import bfp as bfp_suite
from llmcore.bench import common, run_suites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_bfp_quick_writes_json_and_plot(tmp_path, monkeypatch):
    # Shrink the quick run further: one M per regime keeps this a smoke test.
    orig = bfp_suite.run_linear
    monkeypatch.setattr(bfp_suite, "run_linear",
                        lambda device, ms, shapes, progress=None: orig(device, [1, 32],
                                                                       [(256, 128)], progress))
    out = []
    res = run_suites(["bfp"], torch.device("cpu"), quick=True, out_dir=str(tmp_path),
                     progress=False, echo=out.append)
    rows = res["bfp"]["rows"]
    methods = {r.method for r in rows}
    assert {"fp32 F.linear", "bf16 F.linear", "llmcore mxint8 W (fp32 x)",
            "llmcore mxint8 x mxint8"} <= methods
    ours = [r for r in rows if r.method.startswith("llmcore") and r.case.startswith("M=")]
    assert ours and all(r.ms > 0 and "fp32 F.linear" in r.ratios for r in ours)
    files = os.listdir(tmp_path)
    assert len(files) == 1  # one device folder
    folder = tmp_path / files[0]
    doc = json.loads((folder / "bfp.json").read_text())
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["rows"] and "accuracy" in doc and "ceilings" in doc
    assert (folder / "bfp.png").stat().st_size > 1000
    text = "\n".join(out)
    assert "x fp32 F.linear" in text and "mxint4" in text


def test_accuracy_table_orders_formats_sensibly():
    acc = {r["format"]: r for r in bfp_suite.accuracy_table(n_rows=64, k=512)}
    assert acc["mxint8"]["gaussian"] < 2e-2
    assert acc["mxint4"]["gaussian"] > 5 * acc["mxint8"]["gaussian"]
    assert acc["bfp16"]["gaussian"] <= acc["mxint8"]["gaussian"] * 1.1  # smaller blocks
    # Per-block scales beat per-row int8 scaling when a few channels carry outliers.
    assert acc["mxint8"]["outlier-heavy"] < acc["int8 per-row absmax"]["outlier-heavy"]


def test_add_ratios_and_table():
    rows = [common.Row("s", "c", "base", 2.0), common.Row("s", "c", "ours", 0.5)]
    common.add_ratios(rows, ["base"])
    assert rows[1].ratios == {"base": 4.0} and rows[0].ratios == {}
    assert "4.00" in common.format_table(rows, ["base"])


def test_bench_median_counts_calls():
    calls = []
    ms = common.bench(lambda i: calls.append(i), torch.device("cpu"), warmup=2, min_runs=5,
                      min_time_s=0.0)
    assert ms >= 0 and calls == list(range(7))  # rotation index advances every call


def test_cli_unknown_suite_and_info(capsys):
    assert cli.main(["bench", "nosuch", "--no-save", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark suite" in err
    assert err.startswith("llmcore bench: ") and err.count("\n") == 1  # one line, no traceback
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "extension loaded: True" in out and "cpu kernels: bfp_quantize" in out


def test_cli_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    assert "bfp" in capsys.readouterr().out.split()


def test_device_slug_is_a_folder_name():
    slug = common.device_slug(torch.device("cpu"))
    assert slug.startswith("cpu") and "/" not in slug and " " not in slug


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_slug_gpu():
    assert "/" not in common.device_slug(torch.device("cuda"))


@pytest.mark.parametrize("suite", ["attention", "decode"])
def test_other_suites_quick(tmp_path, suite):
    res = run_suites([suite], torch.device("cpu"), quick=True, out_dir=str(tmp_path),
                     progress=False, echo=lambda s: None)[suite]
    rows = res["rows"]
    assert rows and all(r.ms > 0 and r.metric > 0 for r in rows)
    ours = [r for r in rows if r.method.startswith("llmcore")]
    assert ours and all(res["baselines"][0] in r.ratios for r in ours)
    folder = tmp_path / os.listdir(tmp_path)[0]
    assert json.loads((folder / f"{suite}.json").read_text())["rows"]


def test_bench_assisted_quick(tmp_path):
    res = run_suites(["assisted"], torch.device("cpu"), quick=True, out_dir=str(tmp_path),
                     progress=False, echo=lambda s: None)["assisted"]
    rows = res["rows"]
    methods = {r.method for r in rows}
    assert {"plain greedy", "self mxint8", "self mxint4", "prompt lookup"} <= methods
    for r in rows:
        assert r.ms > 0 and r.metric > 0
        if r.method != "plain greedy":
            e = r.extra
            assert "plain greedy" in r.ratios
            assert e["new_tokens"] == e["accepted"] + e["target_tokens"] == 24
            assert e["predicted_speedup"] > 0 and e["draft_cost_ratio"] >= 0
            # measured against the plain runs alternated with this row's own
            assert r.ratios["plain greedy"] == pytest.approx(e["plain_s_alternated"] * 1e3 / r.ms)
    assert "predicted" in res["text"]
    folder = tmp_path / os.listdir(tmp_path)[0]
    assert json.loads((folder / "assisted.json").read_text())["rows"]


def _git_status(root):
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                             cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def test_cli_bench_writes_to_out_and_leaves_the_checkout_unchanged(tmp_path, monkeypatch,
                                                                    capsys):
    """`llmcore bench SUITE --out DIR` writes only under DIR; without --out, a new run
    folder under the current directory. The checkout (benchmarks/results/) stays as it is."""
    monkeypatch.setattr(attention_suite, "cases",
                        lambda device, quick: [(1, 2, 32, 64, False, torch.float32)])
    before = _git_status(ROOT)
    out = tmp_path / "out"
    argv = ["bench", "attention", "--quick", "--device", "cpu", "--no-progress", "--no-plot"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    (folder,) = out.iterdir()  # one device folder
    assert [p.name for p in folder.iterdir()] == ["attention.json"]
    assert json.loads((folder / "attention.json").read_text())["rows"]
    assert str(out) in capsys.readouterr().out

    monkeypatch.chdir(tmp_path / "out")
    assert cli.main(argv) == 0
    (run,) = (out / "llmcore-runs").iterdir()
    assert run.name.startswith("bench-")
    assert [p.name for p in (run / folder.name).iterdir()] == ["attention.json"]
    if before is not None:
        assert _git_status(ROOT) == before


def test_every_command_module_is_registered(capsys):
    modules = [m.name for m in pkgutil.iter_modules(cli.__path__)
               if not m.name.startswith("_")]
    assert sorted(modules) == sorted(cli.COMMANDS)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.COMMANDS)
    for name in cli.COMMANDS:
        module = importlib.import_module(f"llmcore.cli.{name}")
        assert callable(module.add_parser) and callable(module.run)
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        assert f"llmcore {name}" in capsys.readouterr().out


def test_python_m_llmcore_cli_and_console_script():
    r = subprocess.run([sys.executable, "-m", "llmcore.cli", "info"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "extension loaded" in r.stdout
    from importlib.metadata import entry_points

    scripts = [e for e in entry_points(group="console_scripts") if e.name == "llmcore"]
    if scripts:  # installed: the script is `llmcore.cli:main`
        assert scripts[0].value == "llmcore.cli:main" and scripts[0].load() is cli.main


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_one_line(capsys):
    assert cli.main(["bench", "bfp", "--device", "cuda", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err == "llmcore bench: --device cuda but no CUDA device is available\n"


def test_train_suite_quick(corpus, cache, tmp_path, monkeypatch):
    """`llmcore bench train` end to end on a small corpus and shape: every method timed,
    ratios to both baselines, the loss-parity run, JSON written."""
    from llmcore.bench import train as train_suite
    from llmcore.data.prepare import ensure_shards, ensure_tokenizer
    from llmcore.data.shards import TokenShards

    tok = ensure_tokenizer([str(corpus)], 512, 0.2, progress=False)
    shards = TokenShards(ensure_shards([str(corpus)], tok, 0.2, progress=False))
    monkeypatch.setattr(train_suite, "data", lambda progress=True: shards)
    monkeypatch.setattr(train_suite, "plan", lambda device, quick: [("tiny", 2, 64, 2, 1)])
    monkeypatch.setattr(train_suite, "PARITY_STEPS", {True: 3, False: 3})
    monkeypatch.setitem(train_suite.SHAPES, "tiny", {"preset": "tiny", "model": {
        "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64}})
    from llmcore.data.examples import Encoded, EncodedPair

    g = torch.Generator().manual_seed(0)
    ex = [Encoded(torch.randint(3, 512, (n,), generator=g).tolist(), [0] * 8 + [1] * (n - 8))
          for n in torch.randint(12, 60, (12,), generator=g).tolist()]
    pairs = [EncodedPair(e, Encoded(e.ids[:-1] + [5], e.mask)) for e in ex]
    monkeypatch.setattr(train_suite, "posttrain_data", lambda progress=True: (ex, pairs))
    monkeypatch.setattr(train_suite, "post_plan", lambda quick: (4, 2, 1, 1))
    res = run_suites(["train"], torch.device("cpu"), quick=True, out_dir=str(tmp_path),
                     progress=False, echo=lambda s: None)["train"]
    rows = {r.method: r for r in res["rows"]}
    assert set(rows) == {m[0] for m in train_suite.METHODS} | set(train_suite.POST_METHODS)
    assert all(r.metric > 0 for r in rows.values())
    assert all(rows[m[0]].extra["timed_steps"] == 2 for m in train_suite.METHODS)
    assert set(rows["llmcore mxint8"].ratios) == {"torch fp32", "llmcore bf16 autocast"}
    assert set(rows["sft packed"].ratios) == {"sft padded"}
    assert set(rows["dpo cached reference"].ratios) == {"dpo live reference"}
    assert "Reference cache" in res["text"]
    parity = res["extra"]["loss_parity"]
    assert parity["steps"] == 3 and math.isfinite(parity["relative_gap"])
    assert json.loads((tmp_path / common.device_slug(torch.device("cpu")) / "train.json")
                      .read_text())["rows"]


def _cli_error(argv, capsys) -> str:
    """Run the CLI in-process; an expected user error is one stderr line and status 2."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def tiny_dir(tmp_path):
    from llmcore.models import Transformer, TransformerConfig

    path = tmp_path / "m"
    Transformer(TransformerConfig.from_name("tiny")).save_pretrained(str(path))
    return path


def test_cli_user_errors_are_one_line(tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("LLMCORE_TRACEBACK", raising=False)
    gen = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps([cfg]))
    assert "JSON object" in _cli_error(gen, capsys)
    (tiny_dir / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    assert "num_attention_heads" in _cli_error(gen, capsys)
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    (tiny_dir / "model.safetensors").write_bytes(b"")
    assert "not a valid safetensors file" in _cli_error(gen, capsys)
    assert "--threads" in _cli_error(["bench", "--threads", "-1", "--no-save"], capsys)
    assert "--top-p" in _cli_error(gen + ["--top-p", "2"], capsys)
    if not torch.cuda.is_available():
        assert "cuda" in _cli_error(gen + ["--device", "cuda"], capsys)


def test_cli_bug_prints_traceback_and_hint(monkeypatch, capsys):
    from llmcore.cli import info

    monkeypatch.delenv("LLMCORE_TRACEBACK", raising=False)
    monkeypatch.setattr(info, "run", lambda args: [][1])  # an IndexError: a bug
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "IndexError" in err and "please report it" in err


def test_bench_assisted_trained_pair_quick(tmp_path):
    """--target/--draft: two model directories sharing a tokenizer, held-out stdlib prompts,
    every output equal to plain greedy, each row's speed-up from its alternated plain runs;
    a draft with another vocabulary is refused."""
    from llmcore.bench.assisted import run_trained
    from llmcore.data.corpus import stdlib_documents
    from llmcore.models import Transformer, TransformerConfig
    from llmcore.tokenizer import train_tokenizer

    texts = [d.text for d in stdlib_documents("train", 0.05)][:40]
    tok_dir = train_tokenizer(texts, 300, tmp_path / "tok", show_progress=False)
    vocab = 300
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        torch.manual_seed(seed)
        m = Transformer(TransformerConfig.from_name("tiny", vocab_size=vocab, n_layers=layers))
        m.save_pretrained(str(tmp_path / name))
        for f in os.listdir(tok_dir):
            shutil.copy(tok_dir / f, tmp_path / name / f)
    res = run_trained(torch.device("cpu"), tmp_path / "target", tmp_path / "draft", [2],
                      quick=True, schedule="constant")
    rows = res["rows"]
    assert {r.case for r in rows} == {"B=1 trained target fp32", "B=1 trained target mxint8"}
    assisted = [r for r in rows if r.method != "plain greedy"]
    assert len(assisted) == 4  # two targets x two draft precisions x one gamma
    for r in assisted:
        e = r.extra
        assert e["num_draft_tokens"] == 2 and e["new_tokens"] == 2 * 24  # two prompts
        assert r.ratios["plain greedy"] == pytest.approx(e["plain_s_alternated"] * 1e3 / r.ms)
    torch.manual_seed(2)
    Transformer(TransformerConfig.from_name("tiny", vocab_size=vocab + 64)).save_pretrained(
        str(tmp_path / "other"))
    with pytest.raises(ValueError, match="vocab_size"):
        run_trained(torch.device("cpu"), tmp_path / "target", tmp_path / "other", quick=True)
