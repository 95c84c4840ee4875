"""`llmcore bench vs-llamacpp`: finding llama.cpp (and the message without it), reading
llama-bench's JSON, the GGUF fallback writer (read back with the gguf package), the
table arithmetic, argument errors, and an end-to-end run when LLMCORE_LLAMACPP is set."""

import json
import os
import stat

import pytest
import torch

from llmcore import cli
from llmcore.bench import llamacpp as vs
from llmcore.bench import run_suites, suite_names
from llmcore.bench.common import Row

# Recorded from `llama-bench -m 110M-Q8_0.gguf -t 2 -r 1 -o json -p 128 -n 0` and
# `... -p 0 -n 64 -d 128` (two runs' lists joined; fields trimmed), with a log line before.
LLAMA_BENCH_JSON = """build: 1 (abcdef0) with cc for x86_64-linux-gnu
[
  {
    "build_commit": "abcdef0", "build_number": 1, "cpu_info": "Intel Xeon",
    "backends": "CPU", "model_filename": "110M-Q8_0.gguf", "model_type": "llama ?B Q8_0",
    "model_size": 117880832, "model_n_params": 109530624, "n_batch": 2048,
    "n_threads": 2, "type_k": "f16", "n_prompt": 128, "n_gen": 0, "n_depth": 0,
    "avg_ns": 301203000, "stddev_ns": 0, "avg_ts": 424.962, "stddev_ts": 0.0,
    "samples_ns": [301203000], "samples_ts": [424.962]
  },
  {
    "build_commit": "abcdef0", "build_number": 1, "cpu_info": "Intel Xeon",
    "backends": "CPU", "model_filename": "110M-Q8_0.gguf", "model_type": "llama ?B Q8_0",
    "model_size": 117880832, "model_n_params": 109530624, "n_batch": 2048,
    "n_threads": 2, "type_k": "f16", "n_prompt": 0, "n_gen": 64, "n_depth": 128,
    "avg_ns": 470588000, "stddev_ns": 0, "avg_ts": 136.0, "stddev_ts": 0.0,
    "samples_ns": [470588000], "samples_ts": [136.0]
  }
]
"""

SMALL = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=512,
             max_seq_len=256)


def small_checkpoint(folder, **overrides):
    """A random small Llama checkpoint with its tokenizer, written by save_pretrained."""
    from llmcore.models import Transformer, TransformerConfig

    cfg = TransformerConfig(**{**SMALL, **overrides})
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(str(folder))
    vs.write_tokenizer(folder, cfg.vocab_size)
    return model


def fake_program(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# ---------------------------------------------------------------------------------------
# Finding llama.cpp
# ---------------------------------------------------------------------------------------
def test_skips_with_a_message_that_says_how_to_get_llamacpp(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMCORE_LLAMACPP", raising=False)
    monkeypatch.setattr(vs.importlib.util, "find_spec", lambda name: None)
    assert vs.find_llamacpp(None) is None
    out = []
    res = run_suites(["vs-llamacpp"], torch.device("cpu"), quick=True, out_dir=str(tmp_path),
                     progress=False, echo=out.append)["vs-llamacpp"]
    assert res["rows"] == [] and res["skipped"] == vs.SKIP_MESSAGE
    for how in ("--llamacpp", "LLMCORE_LLAMACPP", "pip install llama-cpp-python", "cmake"):
        assert how in out[-1]
    assert "skipped" in out[-1] and os.listdir(tmp_path) == []  # nothing written


def test_finds_a_build_and_its_source(tmp_path, monkeypatch):
    src = tmp_path / "llama.cpp"
    (src / "build" / "bin").mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("")
    fake_program(src / "build" / "bin" / "llama-bench")
    fake_program(src / "build" / "bin" / "llama-quantize")
    for given in (src / "build", src):
        lc = vs.find_llamacpp(str(given))
        assert lc.kind == "build" and lc.bench.endswith("bin/llama-bench")
        assert lc.quantize.endswith("bin/llama-quantize") and lc.source == str(src)
        assert vs.find_converter(lc) == str(src / "convert_hf_to_gguf.py")
    monkeypatch.setenv("LLMCORE_LLAMACPP", str(src / "build"))
    assert vs.find_llamacpp(None).bench == lc.bench
    with pytest.raises(ValueError, match="no llama-bench"):
        vs.find_llamacpp(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such file"):
        vs.find_converter(lc, str(tmp_path / "nope.py"))


def test_python_package_is_the_last_resort(monkeypatch):
    monkeypatch.delenv("LLMCORE_LLAMACPP", raising=False)
    monkeypatch.setattr(vs.importlib.util, "find_spec",
                        lambda name: object() if name == "llama_cpp" else None)
    lc = vs.find_llamacpp(None)
    assert lc.kind == "python" and lc.bench is None and vs.find_converter(lc) is None


# ---------------------------------------------------------------------------------------
# llama-bench output
# ---------------------------------------------------------------------------------------
def test_parse_llama_bench_json():
    recs = vs.parse_llama_bench(LLAMA_BENCH_JSON)
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in recs] == [(128, 0, 0),
                                                                         (0, 64, 128)]
    assert vs._pick(recs, 128, 0, 0) == pytest.approx(424.962)
    assert vs._pick(recs, 0, 64, 128) == 136.0
    with pytest.raises(ValueError, match="no pp512"):
        vs._pick(recs, 512, 0, 0)
    with pytest.raises(ValueError, match="no JSON"):
        vs.parse_llama_bench("error: failed to load model\n")
    with pytest.raises(ValueError, match="lacks"):
        vs.parse_llama_bench('[{"n_prompt": 1}]')
    old = json.dumps([{"n_prompt": 0, "n_gen": 8, "n_threads": 1, "avg_ts": 5.0}])
    assert vs.parse_llama_bench(old)[0]["n_depth"] == 0  # builds before --n-depth


# ---------------------------------------------------------------------------------------
# GGUF fallback writer
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_gguf_writer_reads_back(tmp_path, tied, outtype):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    model = small_checkpoint(tmp_path / "m", tie_embeddings=tied)
    vs.write_gguf(tmp_path / "m", tmp_path / "m.gguf", outtype)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = {x.name: x for x in r.tensors}
    c = model.config
    want = {"token_embd.weight": [c.dim, c.vocab_size], "output_norm.weight": [c.dim]}
    if not tied:
        want["output.weight"] = [c.dim, c.vocab_size]
    for i in range(c.n_layers):
        kv = c.n_kv_heads * c.head_dim
        want.update({f"blk.{i}.attn_norm.weight": [c.dim], f"blk.{i}.ffn_norm.weight": [c.dim],
                     f"blk.{i}.attn_q.weight": [c.dim, c.dim], f"blk.{i}.attn_k.weight":
                     [c.dim, kv], f"blk.{i}.attn_v.weight": [c.dim, kv],
                     f"blk.{i}.attn_output.weight": [c.dim, c.dim],
                     f"blk.{i}.ffn_gate.weight": [c.dim, c.ffn_dim],
                     f"blk.{i}.ffn_up.weight": [c.dim, c.ffn_dim],
                     f"blk.{i}.ffn_down.weight": [c.ffn_dim, c.dim]})
    assert {n: x.shape.tolist() for n, x in t.items()} == want
    matrix_type = "F32" if outtype == "f32" else "BF16"
    assert t["blk.0.attn_q.weight"].tensor_type.name == matrix_type
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == c.n_layers
    assert f["llama.attention.head_count_kv"] == c.n_kv_heads
    assert f["llama.feed_forward_length"] == c.ffn_dim
    toks = f["tokenizer.ggml.tokens"]
    assert len(toks) == c.vocab_size and toks[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert f["tokenizer.ggml.bos_token_id"] == 1
    # q rows: head h's rotate-half pairs (i, i + hd/2) become adjacent rows (2i, 2i + 1)
    def data(name):
        x = np.asarray(t[name].data)
        return torch.from_numpy(x.view(np.int16).astype(np.int32) << 16).view(torch.float32) \
            if matrix_type == "BF16" else torch.from_numpy(x.copy())
    wq = model.layers[0].self_attn.q_proj.weight.detach()
    if outtype == "bf16":
        wq = wq.bfloat16().float()
    q = data("blk.0.attn_q.weight")  # [out, in] as numpy holds it
    hd = c.head_dim
    for h, i in [(0, 0), (1, 3), (c.n_heads - 1, hd // 2 - 1)]:
        assert torch.equal(q[h * hd + 2 * i], wq[h * hd + i])
        assert torch.equal(q[h * hd + 2 * i + 1], wq[h * hd + hd // 2 + i])
    assert torch.equal(data("blk.1.ffn_down.weight"),
                       model.layers[1].mlp.down_proj.weight.detach().to(
                           torch.bfloat16 if outtype == "bf16" else torch.float32).float())


def test_gguf_writer_llama3_rope_and_errors(tmp_path):
    gguf = pytest.importorskip("gguf")
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    small_checkpoint(tmp_path / "m", rope_scaling=scaling, rope_theta=500000.0)
    vs.write_gguf(tmp_path / "m", tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    rf = next(x for x in r.tensors if x.name == "rope_freqs.weight")
    vals = torch.from_numpy(rf.data.copy())
    assert vals.shape == (SMALL["dim"] // SMALL["n_heads"] // 2,)
    assert vals[0] == 1.0 and vals[-1] == 32.0  # high frequencies kept, low ones scaled
    assert torch.all(vals[1:] >= vals[:-1])
    with pytest.raises(ValueError, match="outtype"):
        vs.write_gguf(tmp_path / "m", tmp_path / "x.gguf", "q8_0")


def test_gguf_name_maps_every_llama_tensor():
    assert vs.gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert vs.gguf_name("model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"
    assert vs.gguf_name("lm_head.weight") == "output.weight"
    with pytest.raises(ValueError, match="no GGUF name"):
        vs.gguf_name("model.vision.weight")


# ---------------------------------------------------------------------------------------
# Rows, summary and table
# ---------------------------------------------------------------------------------------
def test_rows_summary_and_table_arithmetic():
    ours = [{"decode": 30.0, "prefill": {128: 100.0, 512: 200.0}},
            {"decode": 10.0, "prefill": {128: 300.0, 512: 100.0}},
            {"decode": 20.0, "prefill": {128: 200.0, 512: 150.0}}]
    theirs = [{"decode": 40.0, "prefill": {128: 400.0, 512: 300.0}},
              {"decode": 80.0, "prefill": {128: 400.0, 512: 300.0}},
              {"decode": 60.0, "prefill": {128: 500.0, 512: 300.0}}]
    wb = {"llmcore": 2e8, "llama.cpp": 1e8}
    rows = vs.make_rows("110M", "mxint8", 2, ours, theirs, wb)
    assert all(isinstance(r, Row) for r in rows) and len(rows) == 6
    dec = {r.method: r for r in rows if r.extra["test"] == "decode"}
    assert dec["llmcore"].metric == 20.0 and dec["llama.cpp"].metric == 60.0  # medians
    assert dec["llmcore"].ms == pytest.approx(50.0)
    assert dec["llmcore"].ratios["llama.cpp"] == pytest.approx(20 / 60)
    assert dec["llmcore"].extra["weight_GBps"] == pytest.approx(4.0)  # 2e8 B x 20 / s
    assert dec["llama.cpp"].extra["weight_GBps"] == pytest.approx(6.0)
    mem = {("110M", "mxint8"): {"llmcore": {"rss_mb": 600.0},
                                "llamacpp": {"peak_rss_mb": 200.0}}}
    (s,) = vs.summarize(rows, mem)
    assert (s["model"], s["pair"], s["llamacpp_type"], s["threads"]) == ("110M", "mxint8",
                                                                         "Q8_0", 2)
    assert s["decode_ratio"] == pytest.approx(1 / 3)
    assert s["prefill128_ratio"] == pytest.approx(200 / 400)
    assert s["prefill512_ratio"] == pytest.approx(150 / 300)
    assert s["rss_ratio"] == pytest.approx(3.0)
    table = vs.markdown_table([s])
    assert table.splitlines()[0].startswith("| model |")
    row = table.splitlines()[2]
    for cell in ("mxint8 / Q8_0", "20.0 / 60.0 (0.33x)", "200 / 400 (0.50x)",
                 "150 / 300 (0.50x)", "4.0 / 6.0", "600 / 200 (3.00x)"):
        assert cell in row
    assert "| - |" in vs.markdown_table([{**s, "prefill512_llmcore_tps": None}])


def test_verify_rows_give_the_cost_in_decode_steps():
    # per round: V x (decode tok/s) / (verify tok/s) = ms of the call / ms per token
    ours = [{"decode": 100.0, "prefill": {}, "verify": 250.0},   # 2.0 steps
            {"decode": 50.0, "prefill": {}, "verify": 100.0},    # 2.5
            {"decode": 100.0, "prefill": {}, "verify": 400.0}]   # 1.25
    theirs = [{"decode": 100.0, "prefill": {}, "verify": 125.0},  # 4.0
              {"decode": 100.0, "prefill": {}, "verify": 100.0},  # 5.0
              {"decode": 100.0, "prefill": {}, "verify": 250.0}]  # 2.0
    wb = {"llmcore": 1, "llama.cpp": 1}
    rows = vs.make_rows("110M", "mxint4", 1, ours, theirs, wb, verify=5)
    ver = {r.method: r for r in rows if r.extra["test"] == "verify 5"}
    assert ver["llmcore"].extra["cost_in_decode_steps"] == pytest.approx(2.0)  # median
    assert ver["llama.cpp"].extra["cost_in_decode_steps"] == pytest.approx(4.0)
    assert ver["llmcore"].metric == 250.0 and ver["llmcore"].ms == pytest.approx(20.0)
    (s,) = vs.summarize(rows, {})
    assert s["verify5_cost_llmcore"] == pytest.approx(2.0)
    assert s["verify5_cost_llamacpp"] == pytest.approx(4.0)
    assert s["verify5_ratio"] == pytest.approx(250 / 125)
    table = vs.markdown_table([s], prefill=(), verify=5)
    assert "verify 5: decode steps" in table.splitlines()[0]
    assert table.splitlines()[2].rstrip().endswith("| 2.00 / 4.00 |")
    # without verify figures (or verify=0) no verify row and no column
    rows = vs.make_rows("110M", "mxint4", 1, ours, theirs, wb)
    assert not [r for r in rows if r.extra["test"].startswith("verify")]
    assert "verify" not in vs.markdown_table(vs.summarize(rows, {}), prefill=())


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = vs.make_rows("110M", "mxint4", 1, [{"decode": 1.0, "prefill": {64: 2.0}}],
                        [{"decode": 2.0, "prefill": {64: 2.0}}], {"llmcore": 1, "llama.cpp": 1})
    res = {"extra": {"summary": vs.summarize(rows, {}), "settings": {"prefill": [64]}}}
    path = vs.plot(res, str(tmp_path / "p.png"))
    assert os.path.getsize(path) > 1000


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def test_plan_and_settings():
    assert vs.parse_plan(quick=True) == {"110M": ["mxint8", "mxint4", "bf16", "fp32"]}
    assert vs.parse_plan() == vs.DEFAULT_PLAN
    assert vs.parse_plan("1B", "mxint4,bf16") == {"1B": ["mxint4", "bf16"]}
    assert vs.parse_plan(None, ["fp32"], model_dir="/x/ckpt") == {"/x/ckpt": ["fp32"]}
    with pytest.raises(ValueError, match="unknown pair"):
        vs.parse_plan(pairs="mxint8,q5_k")
    with pytest.raises(ValueError, match="unknown model"):
        vs.parse_plan(models="7B")
    with pytest.raises(ValueError, match="not both"):
        vs.parse_plan(models="1B", model_dir="/x")
    assert "vs-llamacpp" not in suite_names([])  # opt-in: never part of "all suites"
    assert suite_names(["vs-llamacpp"]) == ["vs-llamacpp"]


@pytest.mark.parametrize("argv, message", [
    (["vs-llamacpp", "--pairs", "q5_k"], "unknown pair"),
    (["vs-llamacpp", "--models", "3B"], "unknown model"),
    (["vs-llamacpp", "--llamacpp", "/nonexistent/llama.cpp"], "no llama-bench"),
    (["vs-llamacpp", "--model", "/nonexistent/ckpt"], "no config.json"),
    (["bfp", "--pairs", "mxint8"], "vs-llamacpp suite only"),
    (["bfp", "--prefill", "64"], "vs-llamacpp suite only"),
    (["bfp", "--threads", "1,2"], "one number"),
    (["vs-llamacpp", "bfp"], "on its own"),
])
def test_cli_argument_errors(capsys, argv, message):
    assert cli.main(["bench", *argv, "--no-save", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_threads_must_be_positive_integers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "vs-llamacpp", "--threads", "1,0"])
    assert "expected integers >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# End to end, with a real llama.cpp
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("LLMCORE_LLAMACPP"),
                    reason="set LLMCORE_LLAMACPP to a llama.cpp build to run llama-bench")
def test_end_to_end_quick(tmp_path):
    small_checkpoint(tmp_path / "ckpt")
    opts = {"model_dir": str(tmp_path / "ckpt"), "pairs": "mxint8,mxint4", "threads": [1],
            "prefill": [32, 64], "decode": 8,
            "workdir": str(tmp_path / "work"), "note": "test"}
    res = run_suites(["vs-llamacpp"], torch.device("cpu"), quick=True,
                     out_dir=str(tmp_path / "out"), plot=False, progress=False,
                     echo=lambda s: None, options={"vs-llamacpp": opts})["vs-llamacpp"]
    summary = res["extra"]["summary"]
    assert [(s["pair"], s["llamacpp_type"]) for s in summary] == [("mxint8", "Q8_0"),
                                                                  ("mxint4", "Q4_0")]
    for s in summary:
        assert s["decode_llmcore_tps"] > 0 and s["decode_llamacpp_tps"] > 0
        assert s["prefill32_ratio"] > 0 and s["prefill64_ratio"] > 0
        assert s["rss_mb_llamacpp"] > 0 and s["rss_mb_llmcore"] > 0
        assert s["verify5_cost_llmcore"] > 0 and s["verify5_cost_llamacpp"] > 0
    files = res["extra"]["files"]
    assert "Q8_0" in files["ckpt mxint8"]["tensor_types"]
    assert "Q4_0" in files["ckpt mxint4"]["tensor_types"]
    doc = json.loads((tmp_path / "out" / os.listdir(tmp_path / "out")[0]
                      / "vs-llamacpp.json").read_text())
    assert doc["note"] == "test" and doc["settings"]["rounds"] == 1 and doc["rows"]
    assert doc["settings"]["decode"] == 8 and doc["settings"]["prefill"] == [32, 64]


FAKE_LLAMA_CPP = '''
import time
class Llama:
    def __init__(self, model_path, n_ctx, n_batch, n_threads, n_threads_batch, verbose):
        assert n_ctx >= n_batch and n_threads == n_threads_batch
        self.n = 0
        self.n_tokens = 0
    def n_vocab(self):
        return 100
    def reset(self):
        self.n = 0
    def eval(self, tokens):
        assert all(0 <= t < 100 for t in tokens)
        self.n += len(tokens)
        time.sleep(0.001 * len(tokens))
'''


def test_python_binding_round_and_memory(tmp_path, monkeypatch):
    # llama-cpp-python's binding path, run against a stand-in module in the child process
    (tmp_path / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    lc = vs.LlamaCpp("python")
    s = vs.Settings(prompt=8, decode=4, prefill=(16, 32), threads=(1,), rounds=1, verify=3,
                    verify_reps=2, prefill_reps=2)
    r = vs.llamacpp_round(lc, tmp_path / "m.gguf", 2, s)
    assert set(r["prefill"]) == {16, 32} and 0 < r["decode"] < 1000  # ~1 ms a token
    assert 0 < r["prefill"][32] < 1000 and 0 < r["verify"] < 1000
    assert vs.llamacpp_memory(lc, tmp_path / "m.gguf")["peak_rss_mb"] > 1


def test_llmcore_round_times_each_prefill_prefill_reps_times():
    # a warm-up, then prefill_reps timed prefills of each length (their median)
    from llmcore.models import Transformer, TransformerConfig
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                          vocab_size=50, max_seq_len=64)).eval()
    lengths = []
    real = model.forward

    def counting(ids, *a, **kw):
        if kw.get("prefill"):
            lengths.append(ids.shape[1])
        return real(ids, *a, **kw)
    model.forward = counting
    s = vs.Settings(prompt=8, decode=2, prefill=(16, 24), threads=(1,), rounds=1, verify=0,
                    prefill_reps=3)
    r = vs.llmcore_round(model, 1, s)
    assert lengths.count(16) == 4 and lengths.count(24) == 4
    assert set(r["prefill"]) == {16, 24} and all(v > 0 for v in r["prefill"].values())
    assert vs.Settings.quick().prefill_reps == 1
