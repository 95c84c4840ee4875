"""Sampling functions and generate(): greedy equals a naive full-recompute loop, batching
with padding is length-aware, stop tokens, streaming, seeded sampling; CLI and bench."""

import json
import os

import pytest
import torch

from llmcore import cli
from llmcore.generation import generate, logits_to_probs, sample_next
from llmcore.models import Transformer, TransformerConfig


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------
def test_argmax_at_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits, 0.0, top_k=1, top_p=0.1).tolist() == [1, 0]
    p = logits_to_probs(logits, 0.0)
    assert p.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_top_k_mask_exact():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    p = logits_to_probs(logits, 1.0, top_k=2)
    assert (p > 0).tolist() == [[False, True, True, False, False]]
    ref = torch.softmax(torch.tensor([4.0, 3.0]), 0)
    torch.testing.assert_close(p[0, 1:3], ref)
    assert torch.allclose(logits_to_probs(logits, 1.0, top_k=99), torch.softmax(logits, -1))


def test_top_p_mask_exact():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda p: (logits_to_probs(logits, 1.0, top_p=p)[0] > 0).tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]  # 0.5 reaches 0.5
    assert keep(0.51) == [True, True, False, False]
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]
    assert keep(1e-6) == [True, False, False, False]  # at least one token
    p = logits_to_probs(logits, 1.0, top_p=0.8)[0]
    torch.testing.assert_close(p[:2], torch.tensor([0.5, 0.3]) / 0.8)
    # top_k then top_p on the renormalised top-k distribution
    p = logits_to_probs(logits, 1.0, top_k=3, top_p=0.9)[0]
    assert (p > 0).tolist() == [True, True, True, False]


def test_seeded_samples_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits, 1.0, generator=g)
    freq = torch.bincount(s, minlength=4).float() / s.numel()
    assert torch.allclose(freq, probs, atol=0.02)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(s, sample_next(logits, 1.0, generator=g2))
    # temperature sharpens: at T=0.25 the top token dominates
    s = sample_next(logits, 0.25, generator=g)
    assert (s == 0).float().mean() > 0.9


@pytest.mark.parametrize("kw, msg", [({"temperature": -0.1}, "temperature"),
                                     ({"temperature": 1.0, "top_k": 0}, "top_k"),
                                     ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
                                     ({"temperature": 1.0, "top_p": 1.5}, "top_p")])
def test_sampling_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample_next(torch.zeros(1, 4), **kw)
    with pytest.raises(ValueError, match=msg):
        logits_to_probs(torch.zeros(1, 4), **kw)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_next(torch.zeros(4))


# ---------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig.from_name("tiny")).eval()
    # Larger logits than the default init, so greedy choices have clear margins.
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
    return m


def _with_backend(model, backend):
    model.backend = backend
    return model


@torch.no_grad()
def naive_greedy(model, ids, n):
    seq = ids.clone()
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@torch.no_grad()
def naive_cached_greedy(model, ids, n, storage):
    """One row at a time, the simplest use of a cache: prefill, then one token per call."""
    rows = []
    for row in ids:
        cache = model.new_cache(1, ids.shape[1] + n, storage=storage)
        seq = row[None]
        logits = model(seq, cache=cache)[:, -1]
        for _ in range(n):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = model(nxt, cache=cache)[:, -1]
        rows.append(seq)
    return torch.cat(rows)


@pytest.mark.parametrize("backend", ["llmcore", "torch"])
def test_greedy_equals_naive_loop(tiny, backend):
    m = _with_backend(tiny, backend)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    out = generate(m, ids, 12)
    assert out.shape == (3, 21) and out.dtype == torch.int64
    assert torch.equal(out, naive_greedy(m, ids, 12))
    _with_backend(tiny, "llmcore")


def test_greedy_mxint8_cache_equals_its_naive_loop(tiny):
    m = _with_backend(tiny, "llmcore")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    out = generate(m, ids, 10, cache_storage="mxint8")
    assert torch.equal(out, naive_cached_greedy(m, ids, 10, "mxint8"))


def test_torch_backend_equals_llmcore(tiny):
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    a = generate(_with_backend(tiny, "llmcore"), ids, 10)
    b = generate(_with_backend(tiny, "torch"), ids, 10)
    _with_backend(tiny, "llmcore")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["llmcore", "torch"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_row_what_it_gives_alone(tiny, backend, side):
    m = _with_backend(tiny, backend)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (7, 3, 5, 1)]
    width, pad = 7, 0
    ids = torch.full((4, width), pad, dtype=torch.int64)
    mask = torch.zeros(4, width, dtype=torch.int64)
    for b, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    out = generate(m, ids, 8, attention_mask=mask)
    assert out.shape == (4, width + 8)
    assert torch.equal(out[:, :width], ids)  # the prompt rows as given
    for b, p in enumerate(prompts):
        alone = generate(m, p[None], 8)
        assert torch.equal(out[b, width:], alone[0, len(p):]), (b, side, backend)
    _with_backend(tiny, "llmcore")


def test_eos_stops_a_row_and_pads(tiny):
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(5))
    ref = generate(tiny, ids, 10)
    new = ref[:, 5:]
    eos = int(new[0, 2])  # row 0 stops after its 3rd token
    out = generate(tiny, ids, 10, eos_token_id=[eos], pad_token_id=255)
    for b in range(3):
        hits = (new[b] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 10
        assert torch.equal(out[b, 5:5 + stop], new[b, :stop])
        assert (out[b, 5 + stop:] == 255).all()
    # pad defaults to the eos id; when every row stops the output is shorter
    one = generate(tiny, ids[:1], 10, eos_token_id=eos)
    assert one.shape[1] == 5 + 3 and int(one[0, -1]) == eos


def test_max_new_tokens_edges_and_stream(tiny):
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(6))
    assert torch.equal(generate(tiny, ids, 0), ids)
    one = generate(tiny, ids, 1)
    assert one.shape == (2, 5) and torch.equal(one, naive_greedy(tiny, ids, 1))
    seen = []
    out = generate(tiny, ids, 6, stream=seen.append)
    assert len(seen) == 6 and all(s.shape == (2,) for s in seen)
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])


def test_seeded_sampling_reproducible(tiny):
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(7))
    kw = {"temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = generate(tiny, ids, 16, seed=123, **kw)
    b = generate(tiny, ids, 16, seed=123, **kw)
    c = generate(tiny, ids, 16, seed=124, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = generate(tiny, ids, 16, generator=torch.Generator().manual_seed(123), **kw)
    assert torch.equal(a, d)


def test_generate_errors(tiny):
    ids = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="input_ids"):
        generate(tiny, ids[0], 2)
    with pytest.raises(ValueError, match="integer"):
        generate(tiny, ids.float(), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, ids, -1)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny, ids, 600)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(tiny, ids + 300, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(tiny, ids, 2, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="contiguous"):
        generate(tiny, ids, 2, attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="no real token"):
        generate(tiny, ids, 2, attention_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="seed or generator"):
        generate(tiny, ids, 2, seed=1, generator=torch.Generator())


# ---------------------------------------------------------------------------------------
# CLI and bench
# ---------------------------------------------------------------------------------------
def test_cli_generate_random(capsys):
    assert cli.main(["generate", "--preset", "tiny", "--random", "--max-new-tokens", "5",
                     "--prompt", "hello", "--seed", "0"]) == 0
    out = capsys.readouterr().out.split()
    ids = [int(x) for x in out]
    assert len(ids) == 5 and all(0 <= i < 256 for i in ids)


def test_cli_generate_needs_a_model(capsys):
    assert cli.main(["generate", "--prompt", "x"]) == 2
    assert "--model" in capsys.readouterr().err


def test_bench_generate_quick_writes_json(tmp_path):
    from llmcore.bench import run_suites

    res = run_suites(["generate"], torch.device("cpu"), quick=True, out_dir=str(tmp_path),
                     progress=False, echo=lambda s: None)["generate"]
    rows = res["rows"]
    assert rows and all(r.ms > 0 and r.metric > 0 for r in rows)
    methods = {r.method for r in rows}
    assert {"torch fp32", "llmcore fp32", "llmcore mxint8", "llmcore mxint8 + mxint8 kv"} <= methods
    assert all("torch fp32" in r.ratios for r in rows if r.method != "torch fp32")
    folder = tmp_path / os.listdir(tmp_path)[0]
    assert json.loads((folder / "generate.json").read_text())["rows"]


@pytest.mark.parametrize("quant,kv", [(None, "native"), ("mxint8", "native"), ("mxint4", "mxint8")])
def test_cli_generate_model_dir_streams_the_library_text(tmp_path, capsys, quant, kv):
    """`llmcore generate --model DIR` prints exactly the decoded text of what
    ``generate`` produces for the same options (quantised weights, MXINT8 cache)."""
    pytest.importorskip("tokenizers")
    from helpers import write_model_dir

    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer

    d = write_model_dir(tmp_path / "m")
    argv = ["generate", "--model", str(d), "--prompt", "w5 w17 w99 w5", "--max-new-tokens", "12",
            "--kv-cache", kv, "--device", "cpu"]
    assert cli.main(argv + (["--quantize", quant] if quant else [])) == 0
    printed = capsys.readouterr().out.strip()
    tok = load_tokenizer(d)
    model = Transformer.from_pretrained(d, quantize=quant)
    ids = torch.tensor([tok.encode("w5 w17 w99 w5")])
    out = generate(model, ids, 12, cache_storage=kv, eos_token_id=tok.eos_token_id)
    new = [t for t in out[0, 4:].tolist() if t != tok.eos_token_id]
    assert printed == tok.decode(new).strip()
    assert printed  # the random model produced at least one word


def test_cli_generate_bad_model_dir(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_text_streamer_waits_for_whole_characters_and_skips_eos():
    import io

    from llmcore.generation.streaming import TextStreamer, TokenIdStreamer, per_token
    from llmcore.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert tok.encode("") == [0] and ByteTokenizer(7).encode("a") == [ord("a") % 7]
    ids = tok.encode("é!")  # two bytes for é
    assert tok.decode(ids) == "é!"
    out = io.StringIO()
    s = TextStreamer(tok, eos_token_id=0, file=out)
    writes = []
    for t in [*ids, 0]:
        s(torch.tensor([t]))
        writes.append(out.getvalue())
    assert writes == ["", "é", "é!", "é!"] and s.printed == "é!"
    out = io.StringIO()
    per_token(TokenIdStreamer(file=out))([torch.tensor([3, 4]), torch.tensor([9])])
    assert out.getvalue() == "3 4 "  # row 0 only


def test_named_draft(tiny):
    from llmcore.generation.drafters import named_draft

    assert named_draft("prompt_lookup", tiny, "mxint8") == ("prompt_lookup", "mxint8")
    draft, kv = named_draft("self-mxint4", tiny)
    assert kv == "mxint8" and draft is not tiny
    with pytest.raises(ValueError, match="self-mxint8"):
        named_draft("self-int3", tiny)
    with pytest.raises(FileNotFoundError):
        named_draft("/nonexistent/draft", tiny)
