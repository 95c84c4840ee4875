"""Transformer.decode_greedy and llmcore::greedy_decode: greedy decoding of a whole model,
many steps in one op call.

The contract is the step-by-step loop (``model(tok, cache=cache)`` then argmax, finished
rows filled), bit for bit: every test compares the op's tokens and the cache it leaves with
that loop's on the same model and cache history."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcore import _ext
from llmcore.generation import generate
from llmcore.models import Transformer, TransformerConfig
from llmcore.nn import BFPEmbedding

pytestmark = pytest.mark.skipif(not _ext.has_op("greedy_decode"),
                                reason="extension without greedy_decode")


def _model(dtype=torch.float32, quant=None, embedding="auto", seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=200, vocab_size=211,
               max_seq_len=128)
    cfg.update(kw)
    model = Transformer(TransformerConfig(**cfg), dtype=dtype).eval()
    if quant == "mxint8-weight-only":
        model.quantize("mxint8", act_format=None, embedding=embedding)
    elif quant:
        model.quantize(quant, embedding=embedding)
    return model


def _prefill(model, ids, storage="native", page_size=None, short=0):
    """A cache holding ``ids`` (row 0 rolled back by ``short``) and each row's last pick."""
    cache = model.new_cache(ids.shape[0], 96, storage=storage, page_size=page_size)
    with torch.inference_mode():
        logits = model(ids, cache=cache, prefill=True)
    if short:
        cache.rollback([ids.shape[1] - short] + [ids.shape[1]] * (ids.shape[0] - 1))
    last = torch.tensor(cache.lengths) - 1
    return cache, logits[torch.arange(ids.shape[0]), last].argmax(-1)


def _both(model, steps=12, eos=(), fill=0, done=None, batch=2, **kw):
    """(tokens, cache lengths, the cache's keys) of the op and of the step-by-step loop."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 9),
                        generator=torch.Generator().manual_seed(1))
    out = []
    for op in (True, False):
        cache, tok = _prefill(model, ids, **kw)
        if not op:
            model._greedy_plan = lambda *a: None  # this model only: the per-step loop
        try:
            new = model.decode_greedy(tok, cache, steps, eos_token_id=list(eos), fill=fill,
                                      done=done)
        finally:
            model.__dict__.pop("_greedy_plan", None)
        out.append((new, cache.lengths, _keys(cache)))
    return out


def _keys(cache) -> list[torch.Tensor]:
    """Each sequence's cached keys [layers, length, kv_heads, head_dim] (pages gathered in
    order: where the pages lie depends on when they were reserved)."""
    k = cache.k_values
    if cache.page_size is None:
        return [k[:, b, :n].clone() for b, n in enumerate(cache.lengths)]
    return [torch.cat([k[:, p] for p in pages], 1)[:, :n].clone()
            for pages, n in zip(cache._pages, cache.lengths, strict=True)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant,embedding", [(None, None), ("mxint8", "auto"), ("mxint4", "auto"),
                                             ("mxint8", None), ("mxint8-weight-only", "auto")])
def test_equals_step_by_step(dtype, quant, embedding):
    model = _model(dtype, quant, embedding)
    if quant and embedding:
        assert isinstance(model.embed_tokens, BFPEmbedding)
    (a, la, ka), (b, lb, kb) = _both(model, short=3)
    assert model._plan.head is not None  # the op took it
    assert a.shape == (2, 12) and torch.equal(a, b)
    assert la == lb == [9 - 3 + 12, 9 + 12]
    assert _same(ka, kb)


def test_tied_bias_and_untied_head():
    model = _model(attention_bias=True, tie_embeddings=False)
    (a, la, _), (b, lb, _) = _both(model)
    assert torch.equal(a, b) and la == lb


@pytest.mark.parametrize("storage,page_size", [("mxint8", None), ("native", 8),
                                               ("mxint8", 16)])
def test_cache_kinds(storage, page_size):
    model = _model(quant="mxint4")
    (a, la, ka), (b, lb, kb) = _both(model, steps=20, storage=storage, page_size=page_size,
                                     short=2)
    assert torch.equal(a, b) and la == lb and _same(ka, kb)


def test_eos_fill_and_done():
    model = _model(quant="mxint8")
    ref = _both(model, steps=12)[0][0]
    eos = int(ref[0, 3])  # row 0 stops at its 4th token
    (a, la, _), (b, lb, _) = _both(model, steps=12, eos=[eos], fill=7)
    assert torch.equal(a, b) and la == lb
    stop = int((ref[0] == eos).nonzero()[0])
    assert torch.equal(a[0, :stop + 1], ref[0, :stop + 1]) and (a[0, stop + 1:] == 7).all()
    # rows done before the call are filled from the first step; all done: one step, then stop
    (c, lc, _), (d, ld, _) = _both(model, steps=12, eos=[eos], fill=eos,
                                   done=torch.tensor([True, False]))
    assert torch.equal(c, d) and lc == ld and (c[0] == eos).all()
    (e, le, _), (f, lf, _) = _both(model, steps=12, eos=[eos], fill=5,
                                   done=torch.tensor([True, True]))
    assert torch.equal(e, f) and e.tolist() == [[5], [5]] and le == lf == [10, 10]


def test_steps_zero_and_continuation():
    model = _model(quant="mxint4")
    ids = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(3))
    cache, tok = _prefill(model, ids)
    assert model.decode_greedy(tok, cache, 0).shape == (1, 0) and cache.lengths == [5]
    first = model.decode_greedy(tok.unsqueeze(1), cache, 4)  # [B, 1] tokens too
    rest = model.decode_greedy(first[:, -1], cache, 6)
    cache2, tok2 = _prefill(model, ids)
    whole = model.decode_greedy(tok2, cache2, 10)
    assert torch.equal(torch.cat([first, rest], 1), whole) and cache.lengths == cache2.lengths


def test_generate_takes_the_op_and_gives_the_loops_tokens():
    model = _model(quant="mxint4")
    ids = torch.randint(0, 211, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    calls = []
    real = torch.ops.llmcore.greedy_decode

    class Spy:
        def __call__(self, *a):
            calls.append(a[1])
            return real(*a)

    streamed: list = []
    torch.ops.llmcore.greedy_decode = Spy()
    try:
        fast = generate(model, ids, 40, attention_mask=mask, eos_token_id=[3, 4])
        fast_s = generate(model, ids, 40, attention_mask=mask, eos_token_id=[3, 4],
                          stream=streamed.append)
    finally:
        torch.ops.llmcore.greedy_decode = real
    assert calls and max(calls) == 32 and 1 in calls  # chunks; one step per call streaming
    model._greedy_plan = lambda *a: None
    slow = generate(model, ids, 40, attention_mask=mask, eos_token_id=[3, 4])
    assert torch.equal(fast, slow) and torch.equal(fast_s, slow)
    assert torch.equal(torch.stack(streamed, 1), slow[:, 6:])


def test_hooks_and_module_chain_fall_back():
    model = _model(quant="mxint8")
    seen = []
    h = model.lm_head.register_forward_hook(lambda *a: seen.append(1))
    try:
        (a, _, _), (b, _, _) = _both(model, steps=5)
    finally:
        h.remove()
    assert torch.equal(a, b) and len(seen) == 2 * (1 + 5)  # each prefill, then every step
    cache, tok = _prefill(model, torch.ones(1, 3, dtype=torch.long))
    with torch.inference_mode():  # as decode_greedy calls it
        assert model._greedy_plan(tok, cache) is not None
        model.fused_inference = False
        assert model._greedy_plan(tok, cache) is None


def test_the_torch_backend_runs_the_loop():
    model = _model(quant=None)
    torch_model = Transformer(model.config, backend="torch").eval()
    torch_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 211, (1, 7), generator=torch.Generator().manual_seed(5))
    cache, tok = _prefill(torch_model, ids)
    with torch.inference_mode():
        assert torch_model._greedy_plan(tok, cache) is None
    out = torch_model.decode_greedy(tok, cache, 6)
    assert out.shape == (1, 6) and cache.lengths == [13]


@pytest.mark.parametrize("quant", [None, "mxint8", "mxint4"])
@pytest.mark.parametrize("prefix", [2, 3])
def test_prefix_tokens(quant, prefix):
    """tokens [B, P]: the first step feeds all P (rows of different lengths), then the loop;
    the op and the step-by-step path (a forward of the P tokens, then one token a step)
    give the same tokens, lengths and cached keys, and the cache holds the P tokens."""
    model = _model(quant=quant)
    ids = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(4))
    runs = []
    for op in (True, False):
        cache = model.new_cache(2, 96)
        with torch.inference_mode():
            model(ids[:, :9 - prefix], cache=cache, prefill=True)
        cache.rollback([9 - prefix - 2, 9 - prefix])
        if not op:
            model._greedy_plan = lambda *a: None
        try:
            new = model.decode_greedy(ids[:, 9 - prefix:], cache, 7)
        finally:
            model.__dict__.pop("_greedy_plan", None)
        runs.append((new, cache.lengths, _keys(cache)))
    (a, la, ka), (b, lb, kb) = runs
    assert a.shape == (2, 7) and torch.equal(a, b)
    assert la == lb == [9 - 2 + 6, 9 + 6] and _same(ka, kb)
    # the prefix's keys are those of a forward over it
    cache = model.new_cache(2, 96)
    with torch.inference_mode():
        model(ids, cache=cache, prefill=True)
    ref = _keys(cache)
    assert torch.allclose(ka[1][0, :9], ref[1][0], atol=1e-5, rtol=1e-4)  # layer 0


def test_errors_leave_the_cache_as_it_was():
    model = _model(quant="mxint4")
    ids = torch.randint(0, 211, (2, 5), generator=torch.Generator().manual_seed(6))
    cache, tok = _prefill(model, ids)
    for kw, msg in [({"tokens": tok.view(2, 1, 1)}, "tokens must be"),
                    ({"tokens": tok.view(2, 1)[:, :0]}, "tokens must be"),
                    ({"tokens": tok.view(2, 1).expand(2, 130)}, "past max_seq_len"),
                    ({"tokens": tok[:1]}, "cache holds 2"),
                    ({"tokens": torch.tensor([0, 211])}, "outside the vocabulary"),
                    ({"steps": -1}, "steps must be"), ({"steps": 2.0}, "steps must be"),
                    ({"eos_token_id": [-1]}, "non-negative"), ({"fill": True}, "non-negative"),
                    ({"done": torch.zeros(3, dtype=torch.bool)}, "done must be"),
                    ({"done": torch.zeros(2)}, "done must be"),
                    ({"steps": 200}, "past max_seq_len")]:
        args = {"tokens": tok, "cache": cache, "steps": 3, **kw}
        with pytest.raises(ValueError, match=msg):
            model.decode_greedy(**args)
        assert cache.lengths == [5, 5] and not cache._pending


def test_op_errors_name_the_argument():
    model = _model(quant="mxint4")
    ids = torch.randint(0, 211, (1, 4))
    cache, tok = _prefill(model, ids)
    model.decode_greedy(tok, cache, 1)
    plan = model._plan
    cos, sin = model._rope_tables(8, torch.device("cpu"))
    base = dict(tokens=tok, steps=2, weights=plan.weights, embed_weight=plan.embedding[0],
                embed_exponent=plan.embedding[1], embed_bits=plan.embedding[2],
                embed_block=plan.embedding[3], head=plan.head, head_spec=plan.head_spec,
                rope_cos=cos, rope_sin=sin, k_cache=cache.k_values, v_cache=cache.v_values,
                k_exponent=None, v_exponent=None, cache_seqlens=cache._seq, block_table=None,
                softmax_scale=0.25, eos=[], fill=0, done=torch.zeros(1, dtype=torch.bool))
    op = torch.ops.llmcore.greedy_decode
    for kw, msg in [({"tokens": tok.int()}, "tokens"), ({"steps": -2}, "steps must be"),
                    ({"tokens": tok.view(1, 1, 1)}, "tokens must be"),
                    ({"tokens": tok.view(1, 1).expand(1, 3), "rope_cos": cos[:7],
                      "rope_sin": sin[:7]}, "rope_cos holds 7"),
                    ({"rope_cos": cos[:5], "rope_sin": sin[:5]}, "rope_cos holds 5"),
                    ({"rope_cos": cos.double()}, "rope_cos"),
                    ({"head": plan.head[:2]}, "head must hold"),
                    ({"head_spec": [9, 0, 4, 32]}, "head: kind must be"),
                    ({"cache_seqlens": cache._seq.long()}, "cache_seqlens"),
                    ({"done": torch.zeros(2, dtype=torch.bool)}, "done must be"),
                    ({"embed_exponent": None}, "embed_weight must be")]:
        with pytest.raises((RuntimeError, ValueError), match=msg):
            op(**{**base, **kw})
    assert cache.lengths == [5]


def test_kv_cache_commit_part_of_a_step():
    model = _model()
    cache = model.new_cache(2, 64, page_size=4)
    cache.prepare(10)
    used = cache.num_pages - len(cache._free)
    assert used == 2 * 3
    cache.commit(5)
    assert cache.lengths == [5, 5] and cache._seq.tolist() == [5, 5]
    assert cache.num_pages - len(cache._free) == 2 * 2  # the pages past 5 tokens returned
    cache.prepare(2)
    with pytest.raises(ValueError, match="num_new must be"):
        cache.commit(3)
    cache.commit(0)
    assert cache.lengths == [5, 5] and not cache._pending


def test_plan_follows_a_replaced_head():
    model = _model(quant="mxint8")
    _both(model, steps=2)
    old = model._plan
    model.lm_head = nn.Linear(96, 211, bias=False)
    (a, _, _), (b, _, _) = _both(model, steps=6)
    assert model._plan is not old and model._plan.head is not None and torch.equal(a, b)
