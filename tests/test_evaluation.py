"""Evaluation: multiple choice by log-likelihood (known answers with a stub model whose
log-probs are set by hand, packed scoring against a plain forward), few-shot prompts, the
stdlib next-line set; the pairwise win rate (symmetry under position swap, bootstrap CI,
length control on data with a known length bias); the n-gram contamination check on
planted overlaps; and the commands."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from llmcore.cli import main
from llmcore.data.corpus import Document
from llmcore.evaluation.contamination import (
    NgramIndex,
    check_contamination,
    ngram_keys,
    read_eval_items,
    shard_stream,
)
from llmcore.evaluation.judges import Judge
from llmcore.evaluation.multiple_choice import (
    MCItem,
    build_prompt,
    evaluate_multiple_choice,
    item_from_row,
    loglikelihoods,
    pick_shots,
    read_items,
    stdlib_mc_items,
    write_stdlib_mc,
)
from llmcore.evaluation.win_rate import (
    LogprobPairwiseJudge,
    PairwiseJudge,
    PointwisePairwise,
    bootstrap_ci,
    format_table,
    length_controlled,
    win_rate,
)
from llmcore.models import Transformer, TransformerConfig
from llmcore.tokenizer import ByteTokenizer


class StubLM(nn.Module):
    """A byte-level 'model' whose next-token log-probs are set by hand: every byte in
    ``favoured`` gets logit ``bonus``, every other byte 0, whatever the context."""

    def __init__(self, favoured: str = "x", bonus: float = 3.0, max_seq_len: int = 512):
        super().__init__()
        self.config = TransformerConfig.from_name("tiny", vocab_size=256, max_seq_len=max_seq_len)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.row = torch.zeros(256)
        self.row[list(favoured.encode())] = bonus
        self.calls = 0

    def forward(self, ids, cu_seqlens=None):
        self.calls += 1
        return self.row.expand(*ids.shape, 256).clone()

    def logp(self, text: str) -> float:
        lp = torch.log_softmax(self.row, -1)
        return float(sum(lp[b] for b in text.encode()))


def tiny_model(max_seq_len: int = 256) -> Transformer:
    cfg = TransformerConfig.from_name("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4,
                                      n_kv_heads=2, ffn_dim=128, max_seq_len=max_seq_len)
    return Transformer(cfg).eval()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- multiple choice

def test_multiple_choice_accuracy_with_known_answers():
    # The stub favours "x": a choice of x's is the most likely per character; a short
    # choice of other bytes is the most likely in total (fewer tokens).
    tok, model = ByteTokenizer(), StubLM()
    items = [MCItem("Which?", ("xxxxxxxx", "ab", "cdefghijk"), 0, "norm_wins"),
             MCItem("Which?", ("qr", "xxxxxxxxxxxx"), 0, "acc_wins"),
             MCItem("Which?", ("abc", "xyz", "xxx"), 2, "both")]
    r = evaluate_multiple_choice(model, tok, items, template="plain")
    picks = [(row["pred"], row["pred_norm"]) for row in r.rows]
    assert picks == [(1, 0), (0, 1), (2, 2)]
    assert r.acc == pytest.approx(2 / 3) and r.acc_norm == pytest.approx(2 / 3)
    assert r.subjects == {"norm_wins": {"n": 1, "acc": 0.0, "acc_norm": 1.0},
                          "acc_wins": {"n": 1, "acc": 1.0, "acc_norm": 0.0},
                          "both": {"n": 1, "acc": 1.0, "acc_norm": 1.0}}
    # the log-likelihoods are the stub's, choice by choice
    assert r.rows[0]["loglikelihoods"] == pytest.approx([model.logp(c) for c in items[0].choices],
                                                        abs=1e-4)
    assert r.acc_stderr == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    table = r.table()
    assert "norm_wins" in table and table.splitlines()[-1].startswith("overall")


def test_packed_scoring_matches_a_plain_forward():
    torch.manual_seed(0)
    model, tok = tiny_model(), ByteTokenizer()
    reqs = [("Question: 2+2?\nAnswer:", " 4"), ("def f(x):\n", "    return x"),
            ("a", "bcdefgh"), ("Question: 2+2?\nAnswer:", " five")]
    packed = loglikelihoods(model, tok, reqs, max_tokens=40)  # several forward passes
    for (ctx, cont), (s, n) in zip(reqs, packed, strict=True):
        stripped = ctx.rstrip(" ")
        cont = ctx[len(stripped):] + cont
        ids = tok.encode(stripped) + tok.encode(cont)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        k = len(tok.encode(stripped))
        want = sum(float(lp[t - 1, ids[t]]) for t in range(k, len(ids)))
        assert n == len(ids) - k
        assert s == pytest.approx(want, abs=1e-4)


def test_long_prompts_lose_context_from_the_left():
    model, tok = StubLM(max_seq_len=16), ByteTokenizer()
    (s, n), = loglikelihoods(model, tok, [("y" * 100, "xxx")])
    assert n == 3 and s == pytest.approx(model.logp("xxx"), abs=1e-4)
    with pytest.raises(ValueError, match="leaves no context"):
        loglikelihoods(model, tok, [("a", "x" * 16)])
    with pytest.raises(ValueError, match="empty continuation"):
        loglikelihoods(model, tok, [("a", "")])


def test_few_shot_prompt_format():
    dev = [MCItem("2+2?", ("3", "4"), 1, "math"), MCItem("Capital of France?", ("Paris", "Rome"),
                                                        0, "geo"),
           MCItem("3+3?", ("6", "7"), 0, "math")]
    item = MCItem("1+1?", ("2", "11"), 0, "math")
    shots = pick_shots(item, dev, 2)
    assert shots == [dev[0], dev[2]]                  # same subject first, in file order
    assert pick_shots(item, dev, 3)[-1] == dev[1]     # then the others
    assert pick_shots(dev[0], dev, 5) == [dev[2], dev[1]]  # never the item itself
    assert build_prompt(item, shots, "cloze") == (
        "Question: 2+2?\nAnswer: 4\n\nQuestion: 3+3?\nAnswer: 6\n\nQuestion: 1+1?\nAnswer:")
    assert build_prompt(item, shots[:1], "letters") == (
        "The following are multiple choice questions (with answers) about math.\n\n"
        "2+2?\nA. 3\nB. 4\nAnswer: B\n\n1+1?\nA. 2\nB. 11\nAnswer:")
    assert build_prompt(item, shots[:1], "plain") == "2+2?4\n\n1+1?"
    with pytest.raises(ValueError, match="template"):
        build_prompt(item, (), "chat")


def test_few_shot_examples_reach_the_model():
    model, tok = StubLM(), ByteTokenizer()
    items = [MCItem("q", ("xx", "ab"), 0, "s")]
    dev = [MCItem("d", ("yy", "zz"), 1, "s")]
    r = evaluate_multiple_choice(model, tok, items, dev, shots=1, template="cloze")
    assert r.acc == 1.0
    with pytest.raises(ValueError, match="dev set of at least 2"):
        evaluate_multiple_choice(model, tok, items, dev, shots=2)


def test_reading_items_and_bad_rows(tmp_path):
    p = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "s"},
        {"question": "q2", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D"},
        {"question": "q3", "choices": ["a", "b"], "answer": "1"}])
    items = read_items(p)
    assert [i.answer for i in items] == [2, 3, 1]
    assert items[1].choices == ("a", "b", "c", "d") and items[1].subject == "all"
    bad = [({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
           ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer"),
           ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer"),
           ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer"),
           ({"question": "", "choices": ["a", "b"], "answer": 0}, "question"),
           ({"choices": ["a", "b"], "answer": 0}, "question"),
           ({"question": "q", "choices": ["a", 3], "answer": 0}, "choices")]
    for row, msg in bad:
        with pytest.raises(ValueError, match=msg):
            item_from_row(row, "x.jsonl:1")
    (tmp_path / "bad.jsonl").write_text('{"question": "q",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_items(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no items"):
        read_items(tmp_path / "empty.jsonl")


SOURCE = "\n".join(
    [f"value_{i} = compute_something({i}, scale={i * 3})" for i in range(20)]
    + ["def handler(request):", "    response = build_response(request)",
       "    response.headers['x'] = 'y'", "    return response"] * 3)


def test_stdlib_items_are_deterministic_and_fair():
    docs = [Document("pkg/mod.py", SOURCE), Document("tiny.py", "a = 1\n")]
    items = stdlib_mc_items(docs, context_lines=5, per_file=6)
    assert items == stdlib_mc_items(docs, context_lines=5, per_file=6)
    assert len(items) == 6 and {i.subject for i in items} == {"pkg"}
    lines = SOURCE.splitlines()
    for it in items:
        line = int(it.source.rsplit(":", 1)[1]) - 1
        assert it.choices[it.answer] == lines[line]
        assert it.question == "\n".join(lines[line - 5:line]) + "\n"
        assert len(set(it.choices)) == 4
        indents = {c[:len(c) - len(c.lstrip())] for c in it.choices}
        assert len(indents) == 1                   # indentation gives nothing away


def test_write_stdlib_mc(corpus, tmp_path):
    st = write_stdlib_mc(tmp_path / "mc", val_fraction=0.3, root=corpus, dev_items=5)
    test, dev = read_items(tmp_path / "mc" / "test.jsonl"), read_items(tmp_path / "mc" / "dev.jsonl")
    assert st["test"] == len(test) > 20 and st["dev"] == len(dev) == 5
    assert all(len(i.choices) == 4 for i in test)
    # held-out files only in test, training files only in dev
    from llmcore.data.corpus import split_of
    assert {split_of(i.source.rsplit(":", 1)[0], 0.3) for i in test} == {"val"}
    assert {split_of(i.source.rsplit(":", 1)[0], 0.3) for i in dev} == {"train"}


# ----------------------------------------------------------------------------- win rate

class BiasedJudge(PairwiseJudge):
    """Knows which answer is better (the one with more '+'), leans to whichever it reads
    first by ``bias`` and never gives a certain verdict."""

    def __init__(self, bias: float = 0.2):
        self.bias = bias

    def compare_many(self, prompts, firsts, seconds):
        out = []
        for a, b in zip(firsts, seconds, strict=True):
            base = 0.5 + 0.3 * ((a.count("+") > b.count("+")) - (a.count("+") < b.count("+")))
            out.append(min(max(base + self.bias, 0.0), 1.0))
        return out


def _quality_answers(n: int, p_a: float, p_b: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = ["+" if x else "-" for x in (torch.rand(n, generator=g) < p_a).tolist()]
    b = ["+" if x else "-" for x in (torch.rand(n, generator=g) < p_b).tolist()]
    return [f"p{i}" for i in range(n)], a, b


def test_win_rate_is_symmetric_under_position_swap():
    prompts, a, b = _quality_answers(300, 0.7, 0.4)
    ab = win_rate(prompts, a, b, BiasedJudge(), resamples=500)
    ba = win_rate(prompts, b, a, BiasedJudge(), resamples=500)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0, abs=1e-12)
    assert ab["ci"][0] == pytest.approx(1 - ba["ci"][1], abs=1e-9)
    assert ab["ci"][1] == pytest.approx(1 - ba["ci"][0], abs=1e-9)
    assert ab["lc_win_rate"] + ba["lc_win_rate"] == pytest.approx(1.0, abs=1e-6)
    assert (ab["wins"], ab["ties"], ab["losses"]) == (ba["losses"], ba["ties"], ba["wins"])
    # the position bias cancels: each pair's preference is the unbiased judge's
    truth = [0.5 + 0.3 * ((x == "+") - (y == "+")) for x, y in zip(a, b, strict=True)]
    assert ab["pref"] == pytest.approx(truth)
    assert ab["first_position_rate"] == pytest.approx(0.7)
    assert ab["ci"][0] < ab["win_rate"] < ab["ci"][1]
    # judged in one order only, the bias goes to A
    one = win_rate(prompts, a, b, BiasedJudge(), swap=False, resamples=0)
    assert one["win_rate"] == pytest.approx(ab["win_rate"] + 0.2)
    assert "table" not in format_table(ab) and "win rate" in format_table(ab, "m1", "m2")


def test_a_judge_that_only_reads_positions_gives_ties():
    prompts, a, b = _quality_answers(50, 0.9, 0.1)

    class FirstAlways(PairwiseJudge):
        def compare_many(self, prompts, firsts, seconds):
            return [1.0] * len(prompts)
    r = win_rate(prompts, a, b, FirstAlways(), resamples=100)
    assert r["win_rate"] == 0.5 and r["ties"] == 50 and r["consistency"] == 0.0


def test_bootstrap_interval_covers_the_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((2000,), 0.3), generator=g)
    lo, hi = bootstrap_ci(x, 2000, seed=3)
    se = math.sqrt(0.3 * 0.7 / 2000)
    assert lo < float(x.mean()) < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < 0.3 < hi


def test_length_controlled_win_rate_removes_a_known_length_bias():
    # Equal quality (theta = 0); the judge prefers the longer answer (phi = 1.5) and A is
    # longer on average, so A's raw win rate is well above one half.
    g = torch.Generator().manual_seed(0)
    n = 4000
    len_b = torch.randint(100, 400, (n,), generator=g).double()
    len_a = len_b + 100 + 150 * torch.randn(n, generator=g, dtype=torch.float64)
    d = len_a - len_b
    y = torch.bernoulli(torch.sigmoid(1.5 * torch.tanh(d / d.std())), generator=g)
    lc = length_controlled(y, len_a, len_b, resamples=200)
    assert float(y.mean()) > 0.6
    assert lc["win_rate"] == pytest.approx(0.5, abs=0.03)
    assert lc["ci"][0] < 0.5 < lc["ci"][1]
    assert lc["phi"] == pytest.approx(1.5, abs=0.25)
    # a real quality gap with no length effect survives: sigma(1) ~ 0.731
    y2 = torch.bernoulli(torch.sigmoid(torch.full((n,), 1.0, dtype=torch.float64)), generator=g)
    assert length_controlled(y2, len_a, len_b)["win_rate"] == pytest.approx(0.731, abs=0.03)
    # with no length difference at all it is the raw win rate
    same = torch.full((n,), 200.0, dtype=torch.float64)
    assert length_controlled(y, same, same)["win_rate"] == pytest.approx(float(y.mean()),
                                                                          abs=1e-5)
    # all wins stay finite
    assert 0.99 < length_controlled(torch.ones(10), len_a[:10], len_b[:10])["win_rate"] <= 1.0


class LengthJudge(Judge):
    name = "length"

    def score(self, prompt, response):
        return float(len(response))


def test_pointwise_judge_as_pairwise():
    judge = PointwisePairwise(LengthJudge(), margin=1.0)
    assert judge.compare_many(["p"] * 3, ["aaaa", "aa", "aaa"], ["a", "aaa", "aaaa"]) == \
        [1.0, 0.5, 0.5]
    r = win_rate(["p", "q"], ["long answer", "x"], ["short", "xy"], judge, resamples=50)
    assert r["win_rate"] == 0.75 and (r["wins"], r["ties"]) == (1, 1)
    with pytest.raises(ValueError, match="score"):
        PointwisePairwise(object())


def test_llm_judge_reads_the_label_logprobs():
    # the stub favours "A": the judge reads P(first) = sigma(logp(" A") - logp(" B"))
    model, tok = StubLM(favoured="A", bonus=2.0), ByteTokenizer()
    judge = LogprobPairwiseJudge(model, tok)
    (p,) = judge.compare_many(["Say hi"], ["hi"], ["hello"])
    want = 1 / (1 + math.exp(model.logp(" B") - model.logp(" A")))
    assert p == pytest.approx(want, abs=1e-5) and p > 0.5
    assert LogprobPairwiseJudge(model, tok, hard=True).compare("x", "a", "b") == 1.0
    # its first-position preference cancels under the swap
    r = win_rate(["Say hi"] * 4, ["hi"] * 4, ["hello"] * 4, judge, resamples=10)
    assert r["win_rate"] == pytest.approx(0.5) and r["first_position_rate"] > 0.5
    with pytest.raises(ValueError, match="no {second} field"):
        LogprobPairwiseJudge(model, tok, template="{prompt} {first}")


def test_win_rate_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        win_rate(["p"], ["a", "b"], ["c"], BiasedJudge())
    with pytest.raises(ValueError, match="no prompts"):
        win_rate([], [], [], BiasedJudge())

    class Broken(PairwiseJudge):
        def compare_many(self, prompts, firsts, seconds):
            return [2.0] * len(prompts)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        win_rate(["p"], ["a"], ["b"], Broken())


# ----------------------------------------------------------------------------- contamination

TRAIN_DOCS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
    "and the bird sings a song about the river that runs through the quiet old town",
    "def parse(text):\n    tokens = text.split()\n    return [int(t) for t in tokens if "
    "t.isdigit()] + [float(t) for t in tokens if not t.isdigit()]",
]


def test_contamination_finds_planted_overlaps():
    words0 = TRAIN_DOCS[0].split()
    planted = " ".join(words0[5:20])                         # 15 words of document 0
    items = [("clean", "an entirely different sentence that shares nothing at all with any "
                       "training document we have written here today"),
             ("copied", f"Question: {planted.upper()}!  Answer: yes"),  # case, punctuation
             ("partial", "alpha beta gamma delta " + " ".join(words0[:13])
              + " epsilon zeta eta theta iota kappa lambda mu nu xi omicron"),
             ("short", "the quick brown fox")]
    r = check_contamination(items, TRAIN_DOCS, n=13)
    rows = {row["id"]: row for row in r["rows"]}
    assert [k for k, v in rows.items() if v["contaminated"]] == ["copied", "partial"]
    assert rows["copied"]["matched"] == 3 and rows["copied"]["fraction"] == pytest.approx(
        3 / rows["copied"]["ngrams"])
    assert rows["partial"]["matched"] == 1
    assert rows["short"]["too_short"] and not rows["short"]["contaminated"]
    assert (r["checked"], r["contaminated"], r["rate"]) == (3, 2, pytest.approx(2 / 3))
    assert rows["copied"]["ngrams"] == 6                     # 18 words
    strict = check_contamination(items, TRAIN_DOCS, n=13, min_fraction=0.5)
    assert [row["id"] for row in strict["rows"] if row["contaminated"]] == ["copied"]


def test_contamination_on_token_ids_across_chunk_edges():
    stream = torch.randint(0, 200, (5000,))
    items = [("hit", stream[1990:2010].tolist()), ("miss", [250] * 30)]  # crosses 2000
    index = NgramIndex([u for _, u in items], n=13)

    class Shards:
        def tokens(self, split):
            return stream
    for chunk in shard_stream(Shards(), ["train"], n=13, chunk=2000):
        index.update(chunk, chunk=700)
    rows = index.report([i for i, _ in items])
    assert rows[0]["matched"] == rows[0]["ngrams"] == 8 and not rows[1]["contaminated"]
    assert index.units_read == 5000 + 2 * 12          # two chunk overlaps of n - 1
    # the same window has the same key wherever it is; different windows differ
    k = ngram_keys(torch.tensor([1, 2, 3, 4, 1, 2, 3]), 3)
    assert k[0] == k[4] and len(set(k.tolist())) == 4
    assert len(set(ngram_keys(torch.arange(100), 5).tolist())) == 96


def test_contamination_with_a_tokenizer_and_bad_inputs(tmp_path):
    tok = ByteTokenizer()
    items = [("x", TRAIN_DOCS[1][10:60])]
    r = check_contamination(items, TRAIN_DOCS, n=13, encode=tok.encode)
    assert r["unit"] == "token" and r["contaminated"] == 1
    r = check_contamination(items, [torch.tensor(tok.encode(TRAIN_DOCS[1]))], n=13,
                            encode=tok.encode)
    assert r["contaminated"] == 1
    with pytest.raises(ValueError, match="need the tokenizer"):
        check_contamination(items, [torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="min_fraction"):
        check_contamination(items, TRAIN_DOCS, min_fraction=2)
    with pytest.raises(ValueError, match="n must be"):
        check_contamination(items, TRAIN_DOCS, n=0)
    p = write_jsonl(tmp_path / "e.jsonl", [
        {"question": "q?", "choices": ["wrong", "right"], "answer": 1},
        {"prompt": "p", "response": "r"}, {"instruction": "i", "output": "o"}])
    assert [t for _, t in read_eval_items([p])] == ["q?\nright", "p\nr", "i\no"]
    write_jsonl(tmp_path / "bad.jsonl", [{"id": 3}])
    with pytest.raises(ValueError, match="bad.jsonl:1: no text field"):
        read_eval_items([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError):
        read_eval_items([tmp_path / "none.jsonl"])


# ----------------------------------------------------------------------------- commands

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus, cache) -> Path:
    from llmcore.data.prepare import ensure_tokenizer

    tok_dir = ensure_tokenizer([str(corpus)], 300, 0.2, progress=False)
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("tiny", vocab_size=300, dim=32, n_layers=1, n_heads=2,
                                      n_kv_heads=1, ffn_dim=64, max_seq_len=256)
    Transformer(cfg).save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, path / name)
    return path


def test_eval_commands(model_dir, tmp_path, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": f"{i} plus one?", "choices": [str(i + 1), str(i + 7)], "answer": "A",
         "subject": "math" if i % 2 else "count"} for i in range(6)])
    rc, out, _ = run_cli(capsys, "eval", "multiple-choice", "--model", model_dir, "--data", mc,
                         "--dev", mc, "--shots", 2, "--json", tmp_path / "mc.json",
                         "--device", "cpu")
    assert rc == 0 and "overall" in out and "math" in out and "2-shot" in out
    r = json.loads((tmp_path / "mc.json").read_text())
    assert r["n"] == 6 and set(r["subjects"]) == {"math", "count"} and len(r["rows"]) == 6

    leak = tmp_path / "leak"
    leak.mkdir()
    (leak / "notes.txt").write_text("We know that 3 plus one? 4, always.\n", encoding="utf-8")
    rc, out, _ = run_cli(capsys, "eval", "multiple-choice", "--model", model_dir, "--data", mc,
                         "--exclude-contaminated", leak, "--ngram", 3, "--val-fraction", 0.01,
                         "--json", tmp_path / "mc_clean.json", "--device", "cpu")
    assert rc == 0 and "dropped 1 of 6 items" in out
    r = json.loads((tmp_path / "mc_clean.json").read_text())
    assert r["n"] == 5 and r["excluded_contaminated"] == [f"{mc}:4"]

    prompts = ["Say hello.", "Name a colour.", "Count to three."]
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "response": "no"} for p in prompts])
    rc, out, _ = run_cli(capsys, "eval", "win-rate", "--a", model_dir, "--b", b, "--prompts", b,
                         "--judge", f"llm:{model_dir}", "--max-new-tokens", 4,
                         "--resamples", 50, "--answers-out", tmp_path / "ans",
                         "--json", tmp_path / "wr.json", "--device", "cpu")
    assert rc == 0 and "length-controlled" in out
    r = json.loads((tmp_path / "wr.json").read_text())
    assert r["n"] == 3 and 0 <= r["win_rate"] <= 1 and len(r["ci"]) == 2
    assert len((tmp_path / "ans" / "a.jsonl").read_text().splitlines()) == 3

    # The code judge: an answer that parses beats one that does not, in both orders.
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": p, "response": "x = 1\n"}
                                                for p in prompts])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": p, "response": "def (:"}
                                              for p in prompts])
    rc, out, _ = run_cli(capsys, "eval", "win-rate", "--a", good, "--b", bad, "--judge", "code",
                         "--resamples", 50, "--json", tmp_path / "wr_code.json")
    assert rc == 0
    r = json.loads((tmp_path / "wr_code.json").read_text())
    assert r["n"] == 3 and r["win_rate"] == 1.0 and r["judge"] == "pointwise:code"

    train = tmp_path / "train"
    train.mkdir()
    (train / "doc.txt").write_text(TRAIN_DOCS[0], encoding="utf-8")
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"text": TRAIN_DOCS[0][:120]},
                                             {"text": "nothing to see " * 10}])
    rc, out, _ = run_cli(capsys, "eval", "contamination", "--eval", ev, "--train", train,
                         "--split", "all", "--json", tmp_path / "c.json")
    assert rc == 0 and out.startswith("1 of 2 items (50.0%)") and "ev.jsonl:1" in out
    assert json.loads((tmp_path / "c.json").read_text())["contaminated"] == 1


@pytest.mark.parametrize("argv, msg", [
    (["eval", "contamination", "--eval", "{tmp}/ev.jsonl", "--shards", "{tmp}"],
     "--shards needs --tokenizer"),
    (["eval", "contamination", "--eval", "{tmp}/none.jsonl", "--train", "{tmp}"],
     "does not exist"),
    (["eval", "win-rate", "--a", "{tmp}/ev.jsonl", "--b", "{tmp}/ev.jsonl", "--judge", "gpt4"],
     "--judge must be llm:MODEL_DIR, rm:MODEL_DIR or code"),
    (["eval", "win-rate", "--a", "{tmp}/ev.jsonl", "--b", "{tmp}/ev.jsonl", "--judge",
      "rm:{tmp}/nowhere"], "is not a directory"),
    (["eval", "win-rate", "--a", "{tmp}/nowhere", "--b", "{tmp}/ev.jsonl", "--judge",
      "llm:{tmp}", "--prompts", "{tmp}/ev.jsonl"], "neither an answers file nor a model"),
    (["eval", "multiple-choice", "--model", "{tmp}", "--data", "{tmp}/ev.jsonl"],
     "'question' must be a non-empty string"),
    (["eval", "multiple-choice", "--model", "{tmp}", "--data", "{tmp}/ev.jsonl", "--shots", "1"],
     "--shots 1 needs --dev"),
])
def test_eval_commands_fail_with_one_line(argv, msg, tmp_path, capsys):
    write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "p", "response": "r"}])
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
