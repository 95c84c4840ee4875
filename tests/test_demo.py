"""``llmcore demo --quick``: the whole library end to end, as the README's first command
runs it — every section, its JSON, the plots, index.html and the final line — plus the
command's refusals (an --out inside the checkout, an unknown section)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmcore.cli import main
from llmcore.demo import SECTIONS, Demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])


def test_quick_demo_runs_every_section(demo_run, capsys):
    out, rc = demo_run
    assert rc == 0
    for name in SECTIONS:
        assert (out / f"{name}.json").is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sections"] == list(SECTIONS) and len(summary["headline"]) == len(SECTIONS)

    k = json.loads((out / "kernels.json").read_text())
    assert k["checks"] and all(c["ok"] for c in k["checks"])
    assert {s["op"] for s in k["speed"]} >= {"BFP linear mxint8", "attention causal fwd"}
    assert all(s["speedup"] > 0 for s in k["speed"])

    p = json.loads((out / "pretrain.json").read_text())
    assert set(p["runs"]) == {"fp32", "mxint8", "draft"}
    for r in p["runs"].values():  # trained: well below the uniform 9 bits of a 512 vocab
        assert 0 < r["val_bpb"] < 6 and r["tokens_per_s"] > 0
    assert 0 < p["xz_bpb"] < 8
    for name in ("fp32", "mxint8", "draft"):
        assert (out / "runs" / name / "final" / "model.safetensors").is_file()

    d = json.loads((out / "data.json").read_text())
    assert d["documents"]["in"] > 50 and [s["step"] for s in d["steps"]]

    post = json.loads((out / "posttrain.json").read_text())
    assert post["sft"]["after"]["val_loss"] < post["sft"]["before"]["val_loss"]
    acc = post["preference_accuracy"]
    assert 0 <= acc["before"] <= 1 and 0 <= acc["after"] <= 1

    g = json.loads((out / "generation.json").read_text())
    methods = [r["method"] for r in g["rows"]]
    assert methods[0] == "plain greedy" and len(methods) == 4
    assert all(r["identical"] for r in g["rows"])

    s = json.loads((out / "scaling.json").read_text())
    assert s["law"]["alpha"] == pytest.approx(0.348, abs=0.05)
    assert s["plan"]["N_opt"] > 0 and s["day_flops"] > 0

    page = (out / "index.html").read_text()
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in page and f"{name}.json" in page
    for png in re.findall(r"src='([^']+)'", page):
        assert (out / png).is_file()


def test_demo_refusals(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(REPO / "demo-out")]) == 2
    assert "inside the llmcore checkout" in capsys.readouterr().err
    assert not (REPO / "demo-out").exists()
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--sections", "nope"]) == 2
    assert "unknown demo section" in capsys.readouterr().err
    with pytest.raises(ValueError, match="preference"):
        Demo(tmp_path, preference="kto")
    # posttrain alone has no pretrained model to start from
    assert main(["demo", "--quick", "--out", str(tmp_path / "y"), "--sections", "posttrain",
                 "--no-progress", "--device", "cpu"]) == 2
    assert "starts from the pretrain section's models" in capsys.readouterr().err
