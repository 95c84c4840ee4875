"""assisted_generate: greedy exactness for every kind of drafter, EOS / length edges,
batches, statistics, and a chi-square test that speculative sampling reproduces the
target's distribution."""

import copy
import itertools
import math

import pytest
import torch

from llmcore import cli
from llmcore.generation import (
    AssistedStats,
    PromptLookupDrafter,
    assisted_generate,
    generate,
    layer_skip_draft,
    predicted_speedup,
    self_draft,
)
from llmcore.generation.sampling import logits_to_probs
from llmcore.models import Transformer, TransformerConfig


def make(seed=0, backend="llmcore", **kw):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_name("tiny", **kw), backend=backend).eval()


@pytest.fixture(scope="module")
def target():
    return make(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "random": make(7, n_layers=1),  # another model: almost nothing accepted
        "identical": copy.deepcopy(target),  # everything accepted
        "self-mxint8": self_draft(target, "mxint8"),
        "self-mxint4": self_draft(target, "mxint4"),
        "prompt_lookup": "prompt_lookup",
    }


def check_stats(st: AssistedStats, batch_new: int | None = None):
    assert st.new_tokens == st.accepted + st.target_tokens
    assert sum(st.accepted_hist) == st.row_steps
    assert sum(n * c for n, c in enumerate(st.accepted_hist)) == st.accepted
    assert st.accepted <= st.drafted
    assert len(st.draft_lengths) == st.row_steps and sum(st.draft_lengths) == st.drafted
    assert 0.0 <= st.acceptance_rate <= 1.0 and 0.0 <= st.alpha <= 1.0
    assert st.elapsed_s > 0 and st.tokens_per_s > 0
    if batch_new is not None:
        assert st.new_tokens == batch_new
    d = st.as_dict()
    assert d["accepted"] == st.accepted and sum(d["accepted_hist"]) == st.row_steps


# ---------------------------------------------------------------------------------------
# greedy: token for token the target's own greedy output
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "identical", "self-mxint8", "self-mxint4",
                                  "prompt_lookup"])
@pytest.mark.parametrize("schedule", ["heuristic", "constant"])
def test_greedy_equals_plain_greedy(target, drafts, kind, schedule):
    ids = torch.randint(0, 256, (1, 11))
    want = generate(target, ids, 48)
    got, st = assisted_generate(target, drafts[kind], ids, 48, schedule=schedule)
    assert torch.equal(got, want)
    check_stats(st, 48)
    if kind == "identical":
        assert st.acceptance_rate == 1.0 and st.rejected == 0
        assert st.tokens_per_call > 4  # few target calls
        if schedule == "heuristic":
            assert st.mean_draft_length > 5  # grew after every full acceptance
    if kind == "random":
        assert st.acceptance_rate < 0.5
    if kind == "prompt_lookup":
        assert st.draft_calls == 0
    else:
        assert st.draft_calls > 0


def test_runs_under_inference_mode_when_the_caller_records_gradients(target, drafts):
    """Called with gradients on (no torch.no_grad around it), assisted generation still
    runs both models under inference mode, as generate does: a quantised target then takes
    the fused decode path instead of autograd's (which re-laid a tiled weight out on every
    call: 14x slower for a trained 41.5M MXINT8 target)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        (torch.is_inference_mode_enabled(), torch.is_grad_enabled()))) for m in
        (target, drafts["random"])]
    try:
        assert torch.is_grad_enabled()
        out, _ = assisted_generate(target, drafts["random"], torch.randint(0, 256, (1, 9)), 12)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) > 2 and all(inf and not grad for inf, grad in seen)
    assert out.is_inference()


@pytest.mark.parametrize("kind", ["random", "self-mxint8", "self-mxint4"])
def test_greedy_proposals_in_one_loop_call_equal_the_token_loop(target, drafts, kind):
    """A model drafter at temperature 0 drafts its K proposals with one decode_greedy call
    (one op on the CPU); the per-token loop (a drafter without decode_greedy) drafts the
    very same tokens: the same acceptance, step by step, and the same output."""
    ids = torch.randint(0, 256, (1, 13))
    fast_draft, loop_calls = copy.deepcopy(drafts[kind]), []
    loop = fast_draft.decode_greedy

    def counted(*args, **kwargs):
        loop_calls.append(args[2])
        return loop(*args, **kwargs)

    fast_draft.decode_greedy = counted
    fast, st_fast = assisted_generate(target, fast_draft, ids, 40, schedule="constant")
    assert loop_calls and all(k >= 1 for k in loop_calls)  # the one-call path ran
    slow_draft = copy.deepcopy(drafts[kind])
    slow_draft.decode_greedy = None  # the drafter falls back to its token loop
    slow, st_slow = assisted_generate(target, slow_draft, ids, 40, schedule="constant")
    assert torch.equal(fast, slow)
    assert st_fast.accepted_hist == st_slow.accepted_hist
    assert st_fast.draft_lengths == st_slow.draft_lengths
    assert (st_fast.accepted, st_fast.drafted) == (st_slow.accepted, st_slow.drafted)


def test_self_draft_acceptance_and_sharing(target):
    from llmcore.nn import BFPLinear

    d = self_draft(target, "mxint4")
    assert d.embed_tokens is target.embed_tokens  # shared, not copied
    assert isinstance(d.layers[0].mlp.up_proj, BFPLinear)
    assert d.layers[0].mlp.up_proj.format.name == "mxint4"
    assert d.lm_head.format.name == "mxint8"
    assert type(target.layers[0].mlp.up_proj) is torch.nn.Linear  # the target is untouched
    ids = torch.randint(0, 256, (2, 16))
    _, st = assisted_generate(target, d, ids, 40, draft_cache_storage="mxint8")
    assert st.acceptance_rate > 0.6, st.summary()
    with pytest.raises(ValueError, match="already quantised"):
        self_draft(d)


def test_self_draft_of_a_tied_model_keeps_the_target_tied():
    m = make(3, tie_embeddings=True)
    d = self_draft(m, "mxint8", lm_head=None)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert d.lm_head.weight is m.embed_tokens.weight  # still shared and tied
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(assisted_generate(m, d, ids, 20)[0], generate(m, ids, 20))


@pytest.mark.parametrize("kind", ["random", "identical", "self-mxint4", "prompt_lookup"])
def test_batch_with_padding_equals_each_row_alone(target, drafts, kind):
    """Left-padded rows of different lengths accept independently; each row is what it
    is alone, and the batch equals the batched plain ``generate``."""
    rows = [torch.randint(0, 256, (n,)) for n in (3, 9, 1, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    got, st = assisted_generate(target, drafts[kind], ids, 30, attention_mask=mask)
    assert torch.equal(got, generate(target, ids, 30, attention_mask=mask))
    check_stats(st, 4 * 30)
    for b, r in enumerate(rows):
        alone = generate(target, r[None], 30)
        assert torch.equal(got[b, width:], alone[0, len(r):])


def test_torch_backend_target(drafts):
    t = make(0, backend="torch")
    ids = torch.randint(0, 256, (2, 7))
    got, _ = assisted_generate(t, drafts["self-mxint8"], ids, 25)
    assert torch.equal(got, generate(t, ids, 25))


def test_mxint8_caches(target, drafts):
    ids = torch.randint(0, 256, (2, 8))
    got, _ = assisted_generate(target, drafts["self-mxint4"], ids, 30, cache_storage="mxint8",
                               draft_cache_storage="mxint8")
    assert torch.equal(got, generate(target, ids, 30, cache_storage="mxint8"))


# ---------------------------------------------------------------------------------------
# EOS and length edges
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["identical", "random", "prompt_lookup"])
def test_eos_stops_rows_like_generate(target, drafts, kind):
    ids = torch.randint(0, 256, (3, 5))
    plain = generate(target, ids, 40)
    eos = int(plain[1, 5 + 17])  # row 1 emits this token at its 18th step (maybe earlier)
    want = generate(target, ids, 40, eos_token_id=eos, pad_token_id=255)
    got, st = assisted_generate(target, drafts[kind], ids, 40, eos_token_id=eos,
                                pad_token_id=255)
    assert torch.equal(got, want)
    rows = plain[:, 5:].tolist()  # each row emits up to and including its first eos
    emitted = sum(r.index(eos) + 1 if eos in r else len(r) for r in rows)
    check_stats(st, emitted)


def test_unsorted_eos_list_pads_like_generate(target, drafts):
    """Without a pad id, rows that stopped are padded with the first EOS id as listed (not
    the smallest), by generate and assisted_generate alike."""
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(11))
    plain = generate(target, ids, 24)[:, 5:].tolist()
    stop = next(t for t in plain[0][2:12] if t not in plain[1] and t != 0)
    other = next(t for t in range(1, 256) if t not in plain[0] + plain[1] and t != stop)
    eos = [max(stop, other), min(stop, other)]  # e.g. [200, 174]: the pad is eos[0]
    want = generate(target, ids, 24, eos_token_id=eos)
    first = plain[0].index(stop)
    assert want[0, 5 + first + 1:].tolist() == [eos[0]] * (23 - first)
    for kind in ("identical", "random", "prompt_lookup"):
        got, _ = assisted_generate(target, drafts[kind], ids, 24, eos_token_id=eos)
        assert torch.equal(got, want), kind


def test_eos_inside_accepted_proposals_is_the_last_token(target, drafts):
    """With an identical draft, whole runs of proposals are accepted; a stop token in the
    middle of one ends the row there (nothing past EOS)."""
    ids = torch.randint(0, 256, (1, 4))
    plain = generate(target, ids, 40)[0, 4:].tolist()
    eos = plain[12]
    first = plain.index(eos)
    got, st = assisted_generate(target, drafts["identical"], ids, 40, eos_token_id=[eos, 999])
    assert got[0, 4:].tolist() == plain[:first + 1]
    assert st.new_tokens == first + 1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17])
@pytest.mark.parametrize("gamma", [1, 4, 15])
def test_max_new_tokens_edges(target, drafts, n, gamma):
    ids = torch.randint(0, 256, (2, 4))
    got, st = assisted_generate(target, drafts["identical"], ids, n, num_draft_tokens=gamma)
    assert torch.equal(got, generate(target, ids, n))
    assert st.new_tokens == 2 * n
    assert max(st.draft_lengths, default=0) <= 15
    assert all(k <= max(n - 1, 0) for k in st.draft_lengths)  # never past max_new_tokens


def test_single_token_prompt_and_long_prompt(target, drafts):
    for plen in (1, 200):
        ids = torch.randint(0, 256, (2, plen))
        got, _ = assisted_generate(target, drafts["self-mxint8"], ids, 12)
        assert torch.equal(got, generate(target, ids, 12))


def test_stream_reports_each_rows_tokens(target, drafts):
    ids = torch.randint(0, 256, (2, 6))
    seen = [[], []]

    def stream(new):
        assert isinstance(new, list) and len(new) == 2
        for b, t in enumerate(new):
            seen[b] += t.tolist()

    got, _ = assisted_generate(target, drafts["identical"], ids, 20, stream=stream)
    assert [got[b, 6:].tolist() for b in range(2)] == seen


# ---------------------------------------------------------------------------------------
# prompt lookup
# ---------------------------------------------------------------------------------------
def test_prompt_lookup_matches():
    pl = PromptLookupDrafter(max_ngram=3)
    seq = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert pl.lookup(seq, 3) == [8, 9, 1]  # the 3-gram 5 6 7 matched
    assert pl.lookup(seq, 10) == [8, 9, 1, 5, 6, 7]
    assert pl.lookup([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert pl.lookup([4, 1, 2, 4, 3, 4], 2) == [3, 4]  # the latest match of "4" wins
    assert pl.lookup([1, 2, 1, 2], 0) == []
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


def test_prompt_lookup_copies_from_the_prompt():
    """A target that copies (here a model whose greedy continuation repeats a cycle) gets
    long accepted runs from prompt lookup."""
    t = make(0)
    ids = torch.randint(0, 256, (1, 8))
    cycle = generate(t, ids, 120)  # random models fall into cycles
    tail = cycle[:, -60:]
    got, st = assisted_generate(t, "prompt_lookup", tail, 40, num_draft_tokens=8,
                                schedule="constant")
    assert torch.equal(got, generate(t, tail, 40))
    assert st.tokens_per_call > 1.5, st.summary()


# ---------------------------------------------------------------------------------------
# speculative sampling reproduces the target's distribution
# ---------------------------------------------------------------------------------------
def chi2_bound(dof: int, z: float = 4.75) -> float:
    """Upper tail bound of chi-square(dof) at about p = 1e-6 (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def exact_joint(model, prompt, n, sampling):
    """Target probability of every length-n continuation (vocab^n of them)."""
    vocab = model.config.vocab_size
    probs = {}
    for seq in itertools.product(range(vocab), repeat=n):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            p = logits_to_probs(model(ids)[0, len(prompt) - 1:-1].float(), *sampling)
        probs[seq] = float(torch.prod(p[torch.arange(n), torch.tensor(seq)]))
    return probs


@pytest.mark.parametrize("sampling,drafter", [
    ((1.0, None, None), "model"),
    ((0.7, 3, None), "model"),
    ((1.3, None, 0.9), "model"),
    ((1.0, None, None), "prompt_lookup"),
])
def test_speculative_sampling_distribution(sampling, drafter):
    """3 tokens after a fixed prompt over a 4-token vocabulary: 64 outcomes. 6000 rows of
    one batch are independent samples; their counts must fit the target's exact joint
    distribution (chi-square), and must not fit the draft's (so the test can fail)."""
    vocab, n, rows = 4, 3, 6000
    t = make(11, vocab_size=vocab)
    prompt = [0, 1, 2, 3, 0, 1, 2]  # repeats, so prompt lookup proposes tokens
    d = make(12, vocab_size=vocab, n_layers=1) if drafter == "model" else "prompt_lookup"
    ids = torch.tensor([prompt] * rows)
    out, st = assisted_generate(t, d, ids, n, num_draft_tokens=2, schedule="constant",
                                temperature=sampling[0], top_k=sampling[1], top_p=sampling[2],
                                seed=1234)
    assert st.drafted > 0 and 0 < st.accepted < st.drafted
    counts = {}
    for row in out[:, len(prompt):].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    want = exact_joint(t, prompt, n, sampling)
    support = [s for s, p in want.items() if p > 0]
    assert sum(counts.get(s, 0) for s in support) == rows  # nothing outside the support
    cells = [s for s in support if want[s] * rows >= 5]
    chi2 = sum((counts.get(s, 0) - want[s] * rows) ** 2 / (want[s] * rows) for s in cells)
    assert chi2 < chi2_bound(len(cells) - 1), chi2
    if drafter == "model":  # the draft alone is clearly distinguishable
        q = exact_joint(d, prompt, n, sampling)
        chi2_q = sum((q[s] * rows - want[s] * rows) ** 2 / (want[s] * rows) for s in cells)
        assert chi2_q > 3 * chi2_bound(len(cells) - 1), chi2_q


# ---------------------------------------------------------------------------------------
# statistics, schedule, errors, CLI
# ---------------------------------------------------------------------------------------
def test_predicted_speedup():
    assert predicted_speedup(0.0, 5, 0.0) == pytest.approx(1.0)
    assert predicted_speedup(1.0, 5, 0.0) == pytest.approx(6.0)
    assert predicted_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)
    with pytest.raises(ValueError):
        predicted_speedup(1.5, 4, 0.1)


def test_heuristic_schedule_moves_gamma(target, drafts):
    ids = torch.randint(0, 256, (1, 5))
    _, st = assisted_generate(target, drafts["identical"], ids, 60, num_draft_tokens=1)
    assert st.draft_lengths[:4] == [1, 3, 5, 7]  # +2 after each full acceptance
    _, st = assisted_generate(target, drafts["random"], ids, 30, num_draft_tokens=6)
    assert st.draft_lengths[:3] == [6, 5, 4]  # -1 after a rejection, down to 1
    assert min(st.draft_lengths[:-1]) == 1 and st.draft_lengths[-1] == 0  # last: no room
    _, st = assisted_generate(target, drafts["random"], ids, 30, num_draft_tokens=6,
                              schedule="constant")
    assert set(st.draft_lengths[:-6]) == {6} and st.draft_lengths[-6:] == [5, 4, 3, 2, 1, 0]


def test_errors(target, drafts):
    ids = torch.randint(0, 256, (1, 4))
    d = drafts["identical"]
    with pytest.raises(ValueError, match="num_draft_tokens"):
        assisted_generate(target, d, ids, 4, num_draft_tokens=0)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        assisted_generate(target, d, ids, 4, num_draft_tokens=16)
    with pytest.raises(ValueError, match="schedule"):
        assisted_generate(target, d, ids, 4, schedule="fast")
    with pytest.raises(ValueError, match="draft_model"):
        assisted_generate(target, "self", ids, 4)
    with pytest.raises(ValueError, match="target itself"):
        assisted_generate(target, target, ids, 4)
    with pytest.raises(ValueError, match="vocab_size"):
        assisted_generate(target, make(1, vocab_size=16), ids, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        assisted_generate(target, make(1, max_seq_len=8), ids, 20)
    with pytest.raises(ValueError, match="max_new_tokens"):
        assisted_generate(target, d, ids, -1)
    with pytest.raises(ValueError, match="input_ids"):
        assisted_generate(target, d, ids[0], 4)
    with pytest.raises(ValueError, match="vocab_size"):
        assisted_generate(target, d, ids + 1000, 4)
    with pytest.raises(ValueError, match="temperature"):
        assisted_generate(target, d, ids, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        assisted_generate(target, d, ids, 600)


def test_cli_generate_assisted(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from helpers import write_model_dir

    d = write_model_dir(tmp_path / "target")
    small = write_model_dir(tmp_path / "draft", seed=5, n_layers=1)
    base = ["generate", "--model", str(d), "--prompt", "w5 w17 w99 w5 w17", "--max-new-tokens",
            "16", "--device", "cpu"]
    assert cli.main(base) == 0
    plain = capsys.readouterr().out.strip()
    for extra in (["--draft", str(small)], ["--draft", "self-mxint4"], ["--draft", "self-mxint8"],
                  ["--prompt-lookup"]):
        assert cli.main(base + extra + ["--stats"]) == 0
        cap = capsys.readouterr()
        assert cap.out.strip() == plain, extra
        assert "acceptance" in cap.err
    assert cli.main(base + ["--draft", "self-int3"]) == 2
    assert "--draft" in capsys.readouterr().err
    assert cli.main(base + ["--draft", str(small), "--prompt-lookup"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", [None, "mxint8"])
def test_layer_skip_draft(fmt):
    m = make(2, n_layers=3, tie_embeddings=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    d = layer_skip_draft(m, 1, fmt)
    assert d.config.n_layers == 1 and len(d.layers) == 1
    assert d.embed_tokens is m.embed_tokens
    if fmt is None:
        assert d.layers[0] is m.layers[0] and d.lm_head is m.lm_head
        ref = Transformer(d.config).eval()
        ref.load_state_dict({k: v for k, v in m.state_dict().items()
                             if not k.startswith(("layers.1.", "layers.2."))})
        ids = torch.randint(0, 256, (1, 7))
        torch.testing.assert_close(d(ids), ref(ids))
    else:
        assert d.lm_head.format.name == "mxint8"
        assert m.lm_head.weight is m.embed_tokens.weight  # the target is untouched
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    ids = torch.randint(0, 256, (2, 6))
    got, st = assisted_generate(m, d, ids, 24)
    assert torch.equal(got, generate(m, ids, 24))
    with pytest.raises(ValueError, match="n_layers"):
        layer_skip_draft(m, 3)


class _BadDrafter:
    """A drafter breaking the protocol in one way."""

    calls = 0

    def __init__(self, how):
        self.how = how

    def prefill(self, seqs):
        pass

    def propose(self, seqs, ks, sampling, generator):
        b, k = len(seqs), max(ks)
        toks = torch.zeros(b, k + 3, dtype=torch.int64)
        if self.how == "too many":
            return toks, None, [k + 3] * b
        if self.how == "out of vocab":
            toks[0, 0] = 10**6
        if self.how == "negative id":
            toks[0, 0] = -1
        if self.how == "float tokens":
            toks = toks.float()
        if self.how == "bad q":
            return toks, torch.zeros(b, k, 7), list(ks)
        if self.how == "garbage past the counts":  # not proposals: never looked at
            toks[:, k:] = 10**6
            toks[-1, max(ks[-1] - 1, 0):] = -1
            return toks, None, [*ks[:-1], max(ks[-1] - 1, 0)]
        return toks, None, list(ks)

    def commit(self, new_lengths):
        pass


@pytest.mark.parametrize("how", ["too many", "out of vocab", "negative id", "float tokens",
                                 "bad q"])
def test_drafter_breaking_the_protocol_is_named(target, how):
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="drafter.propose"):
        assisted_generate(target, _BadDrafter(how), ids, 8, num_draft_tokens=3)


def test_tokens_past_a_rows_count_are_not_checked(target):
    """Entries past each row's proposal count (a row asked for fewer, or the tensor wider
    than the longest) are not proposals: out-of-range values there are no error, and the
    output is the target's greedy one."""
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    out, _ = assisted_generate(target, _BadDrafter("garbage past the counts"), ids, 8,
                               num_draft_tokens=3)
    assert torch.equal(out, generate(target, ids, 8))
