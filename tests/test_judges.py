"""The code sandbox, the code checks and the judges (reward model, LLM grader)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from llmcore.evaluation.judges import CodeJudge, Judge, JudgeLike, LLMJudge, RewardModelJudge
from llmcore.evaluation.verify import assemble, check_code, run_sandboxed


@pytest.mark.parametrize("code, why", [
    ("import os; os.system('true')", "os.system"),
    ("import subprocess; subprocess.run(['true'])", "subprocess"),
    ("import socket; socket.socket()", "socket"),
    ("import os; os.fork()", "os.fork"),
    ("import ctypes; ctypes.CDLL(None)", "ctypes"),
    ("open('/tmp/llmcore-sandbox-escape', 'w').write('x')", "outside the sandbox"),
    ("import os; os.remove('/etc/hostname')", "outside the sandbox"),
])
def test_sandbox_refuses_unsafe_code(code, why):
    r = run_sandboxed(code, timeout=10)
    assert not r.ok and why in (r.error or ""), r
    assert not os.path.exists("/tmp/llmcore-sandbox-escape")


def test_sandbox_limits_time_and_memory_and_allows_its_own_folder():
    t0 = time.perf_counter()
    r = run_sandboxed("while True: pass", timeout=1.0)
    assert r.timed_out and not r.ok and time.perf_counter() - t0 < 8
    r = run_sandboxed("x = bytearray(3 * 1024 ** 3)", timeout=10, memory_mb=256)
    assert not r.ok and "MemoryError" in (r.error or "")
    r = run_sandboxed("open('f.txt', 'w').write('ok'); assert open('f.txt').read() == 'ok'")
    assert r.ok, r
    r = run_sandboxed("import sys; sys.exit(3)")
    assert not r.ok and "SystemExit" in r.error
    with pytest.raises(ValueError, match="timeout"):
        run_sandboxed("pass", timeout=0)


PROMPT = ("Write a Python function `add(a, b)` that: Add two numbers.\n\n"
          ">>> add(1, 2)\n3\n>>> add(2, 2)\n4")


def test_code_checks_parse_and_doctests():
    ok = check_code(PROMPT, "return a + b")
    assert ok.parses and ok.doctests == 2 and ok.passed == 2 and ok.doctest_rate == 1.0
    half = check_code(PROMPT, "return 3")
    assert half.parses and half.passed == 1
    assert not check_code(PROMPT, "return a +").parses
    hang = check_code(PROMPT, "while True: pass", timeout=1.0)
    assert hang.parses and hang.passed == 0
    src, doc, alone = assemble(PROMPT, "    return a + b\n")
    assert src == "def add(a, b):\n    return a + b\n" and alone and doc.startswith("Add")
    method = ("Write a Python function `f(self, x)`, a method of class `C`, that: Doc.\n"
              ">>> C().f(1)\n1")
    assert not assemble(method, "return x")[2]  # needs its class: doctests not run
    assert check_code(method, "return x").doctests == 0
    assert check_code("any prompt", "x = (1,").parses is False  # free-form: the answer itself


def test_code_judge_weights():
    j = CodeJudge(parse_weight=0.5, doctest_weight=2.0)
    assert j.score(PROMPT, "return a + b") == pytest.approx(2.5)
    assert j.score(PROMPT, "return 3") == pytest.approx(1.5)
    assert j.score_many([PROMPT, PROMPT], ["return a +", "return a + b"]) == [0.0, 2.5]
    assert isinstance(j, JudgeLike)
    with pytest.raises(ValueError, match="same length"):
        j.score_many([PROMPT], [])


def test_judge_base_needs_score():
    class Nothing(Judge):
        pass

    with pytest.raises(NotImplementedError):
        Nothing().score_many(["p"], ["r"])

    class Length(Judge):
        def score(self, prompt, response):
            return len(response)

    assert Length().score_many(["a", "b"], ["xy", ""]) == [2.0, 0.0]


class _Tok:
    """A hand-built vocabulary: each character is a token (ids 10..), grades "0".."5"."""

    chat_template = None
    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [10 + (ord(c) % 200) for c in text]


class _GradeModel(torch.nn.Module):
    """Puts fixed next-token logits on the grade tokens at every position."""

    def __init__(self, grade_logits: dict[int, float]):
        super().__init__()
        self.config = type("C", (), {"max_seq_len": 4096})()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.grade_logits = grade_logits

    def forward(self, ids, cu_seqlens=None):
        out = torch.full((*ids.shape, 256), -30.0)
        for tid, v in self.grade_logits.items():
            out[..., tid] = v
        return out


def test_llm_judge_reads_the_grade_from_token_probabilities():
    tok = _Tok()
    ids = {g: tok.encode(g)[0] for g in "012345"}
    # p(4) = p(5) = 1/2: expected grade 4.5
    judge = LLMJudge(_GradeModel({ids["4"]: 5.0, ids["5"]: 5.0}), tok)
    assert judge.score("q", "a") == pytest.approx(4.5, abs=1e-6)
    probs = judge.grade_probs(["q"], ["a"])[0]
    assert probs.sum().item() == pytest.approx(1.0) and probs[4] == pytest.approx(0.5)
    # a grade token far above the others dominates
    judge = LLMJudge(_GradeModel({ids["1"]: 20.0, ids["3"]: 0.0}), tok)
    assert judge.score_many(["q", "q2"], ["a", "b"]) == pytest.approx([1.0, 1.0], abs=1e-6)

    class TwoTokenGrades(_Tok):
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "3" else super().encode(text)

    with pytest.raises(ValueError, match="one token"):
        LLMJudge(_GradeModel({}), TwoTokenGrades())


def test_reward_model_judge_scores_like_the_model(tmp_path, corpus, cache):
    from llmcore.data.examples import Renderer
    from llmcore.data.prepare import ensure_tokenizer
    from llmcore.models import RewardModel, Transformer, TransformerConfig
    from llmcore.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_tokenizer([str(corpus)], 512, 0.2, progress=False))
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(Transformer(TransformerConfig.from_name(
        "tiny", vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
        max_seq_len=128))).eval()
    judge = RewardModelJudge(rm, tok, batch_size=2)
    prompts, answers = ["say hi", "add", "x"], ["hi", "1 + 1", "y"]
    got = judge.score_many(prompts, answers)
    r = Renderer(tok, 128)
    for p, a, g in zip(prompts, answers, got, strict=True):
        e = r.encode([{"role": "user", "content": p}, {"role": "assistant", "content": a}])
        with torch.no_grad():
            assert g == pytest.approx(rm(torch.tensor([e.ids])).item(), abs=1e-5)
    # A prompt that fills max_seq_len alone: the conversation is cut from the left, so the
    # scored last token still follows the answer.
    long_prompt = "word " * 400
    got = judge.score_many([long_prompt], ["tail"])
    e = Renderer(tok, 1 << 30).encode([{"role": "user", "content": long_prompt},
                                       {"role": "assistant", "content": "tail"}])
    assert len(e.ids) > 128
    with torch.no_grad():
        assert got[0] == pytest.approx(rm(torch.tensor([e.ids[-128:]])).item(), abs=1e-5)


def test_data_filter_keeps_what_the_judge_passes(tmp_path, capsys):
    import json

    from llmcore.cli import main
    from llmcore.evaluation.filtering import histogram

    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": PROMPT, "response": "return a + b"},
            {"prompt": PROMPT, "response": "return a +"},  # does not parse
            {"messages": [{"role": "user", "content": PROMPT},
                          {"role": "assistant", "content": "return 3"}]}]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "val.jsonl").write_text(json.dumps(rows[1]) + "\n")
    assert main(["data", "filter", "--data", str(d), "--judge", "code", "--threshold", "1.5",
                 "--out", str(tmp_path / "out")]) == 0
    assert "kept 2 of 3 rows (removed 1)" in capsys.readouterr().out
    kept = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert kept == [rows[0], rows[2]]  # 2.0 and 1.5 pass, 0.0 does not
    assert (tmp_path / "out" / "val.jsonl").read_text() == (d / "val.jsonl").read_text()
    report = json.loads((tmp_path / "out" / "filter.json").read_text())
    assert report["kept"] == 2 and sum(report["histogram"]["counts"]) == 3
    assert histogram([1.0, 1.0]) == {"edges": [1.0, 1.0], "counts": [2]}
    scores = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [x["score"] for x in scores] == [2.0, 0.0, 1.5] and scores[0]["row"].endswith(":1")
    # --keep-fraction: the best third is the one row scoring 2.0.
    assert main(["data", "filter", "--data", str(d), "--judge", "code", "--keep-fraction",
                 "0.33", "--out", str(tmp_path / "o3")]) == 0
    assert "kept 1 of 3 rows (removed 2) at threshold 2 " in capsys.readouterr().out
    assert main(["data", "filter", "--data", str(d), "--judge", "code", "--keep-fraction",
                 "0.66", "--out", str(tmp_path / "o4")]) == 0
    assert json.loads((tmp_path / "o4" / "filter.json").read_text())["threshold"] == 1.5
    for bad in (["--keep-fraction", "0"], ["--keep-fraction", "1.5"],
                ["--threshold", "1", "--keep-fraction", "0.5"]):
        with pytest.raises(SystemExit) as e:  # argparse refuses these
            main(["data", "filter", "--data", str(d), "--judge", "code", *bad,
                  "--out", str(tmp_path / "o5")])
        assert e.value.code == 2 and "--keep-fraction" in capsys.readouterr().err
    assert main(["data", "filter", "--data", str(d), "--judge", "magic", "--threshold", "1",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "expected 'code', 'rm:DIR' or 'llm:DIR'" in capsys.readouterr().err


def _tiny_model_and_tok(corpus):
    from llmcore.data.prepare import ensure_tokenizer
    from llmcore.models import Transformer, TransformerConfig
    from llmcore.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_tokenizer([str(corpus)], 512, 0.2, progress=False))
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_name(
        "tiny", vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
        max_seq_len=128)).eval()
    return model, tok


class _LengthJudge(Judge):
    def score(self, prompt, response):
        return float(len(response))


def test_best_of_n_ranks_samples_by_the_judge(corpus, cache):
    from llmcore.generation import best_of_n

    model, tok = _tiny_model_and_tok(corpus)
    r = best_of_n(model, tok, "Say something.", 6, _LengthJudge(), max_new_tokens=12, seed=3)
    assert len(r["answers"]) == 6 and r["scores"] == sorted(r["scores"], reverse=True)
    assert r["best"] == r["answers"][0] and r["best_score"] == len(r["best"])
    assert r["scores"] == [float(len(a)) for a in r["answers"]]
    with pytest.raises(ValueError, match="n must be"):
        best_of_n(model, tok, "x", 0, _LengthJudge())
    with pytest.raises(ValueError, match="sampling"):
        best_of_n(model, tok, "x", 2, _LengthJudge(), temperature=0.0)


def test_self_correct_keeps_the_best_draft_and_feeds_back(corpus, cache):
    from llmcore.generation import self_correct

    model, tok = _tiny_model_and_tok(corpus)
    seen = []

    class Critic(Judge):
        def score(self, prompt, response):
            return -float(len(seen))  # later drafts score worse

        def feedback(self, prompt, response):
            seen.append(response)
            return "too short"

    r = self_correct(model, tok, "Say something.", Critic(), rounds=2, max_new_tokens=8,
                     temperature=0.8, seed=1)
    assert len(r["drafts"]) == 3 and r["feedback"] == ["too short"] * 3
    assert r["final"] == r["drafts"][0] and r["final_score"] == max(r["scores"])
    fb = CodeJudge().feedback(PROMPT, "return a +")
    assert fb.startswith("it is not valid Python")
    assert "1 of 2 doctests fail" in CodeJudge().feedback(PROMPT, "return 3")
