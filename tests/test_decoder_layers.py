"""llmcore::decoder_layers: a cached inference step's blocks in one op call.

Its contract is the Python chain of Transformer._hidden_fused, bit for bit: every test
compares the two paths' logits with torch.equal on the same model and cache history
(the chain is itself checked against the module chain and transformers elsewhere)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcore import _ext
from llmcore.models import Transformer, TransformerConfig
from llmcore.models import transformer as tf

pytestmark = pytest.mark.skipif(not _ext.has_op("decoder_layers"),
                                reason="extension without decoder_layers")


def _cfg(**kw) -> TransformerConfig:
    base = dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=200, vocab_size=257,
                max_seq_len=96)
    base.update(kw)
    return TransformerConfig(**base)


def _steps(model, ids, storage="native", page_size=None, chunks=(1, 5, 1, 3)):
    """Logits of a prefill of 9 tokens and then cached steps of ``chunks`` tokens (a
    rollback of 2 after the 5-token step, as a rejected draft), and how many steps took
    the op."""
    taken = []
    real = Transformer._decoder_layers

    def spy(self, *a):
        out = real(self, *a)
        taken.append(out is not None)
        return out

    cache = model.new_cache(ids.shape[0], 64, storage=storage, page_size=page_size)
    Transformer._decoder_layers = spy
    try:
        with torch.inference_mode():
            out, pos = [model(ids[:, :9], cache=cache, prefill=True)], 9
            for i, t in enumerate(chunks):
                out.append(model(ids[:, pos:pos + t], cache=cache))
                pos += t
                if i == 1:
                    cache.rollback([n - 2 for n in cache.lengths])
                    pos -= 2
    finally:
        Transformer._decoder_layers = real
    return torch.cat(out, 1), sum(taken)


def _chain(model, ids, **kw):
    """The same steps through the Python chain (the op disabled on this model only)."""
    model._decoder_layers = lambda *a: None
    try:
        return _steps(model, ids, **kw)[0]
    finally:
        del model._decoder_layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant", [None, "mxint8", "mxint4", "mxint8-weight-only", "mixed"])
def test_equals_python_chain(dtype, quant):
    torch.manual_seed(0)
    model = Transformer(_cfg(attention_bias=True), dtype=dtype).eval()
    if quant == "mxint8-weight-only":
        model.quantize("mxint8", act_format=None)
    elif quant == "mixed":  # dense, int8-activation and weight-only projections in one block
        model.quantize("mxint8", exclude=["k_proj", "down_proj"])
        model.layers[1].mlp.up_proj = tf.BFPLinear.from_linear(
            nn.Linear(96, 200, bias=False, dtype=dtype), "mxint4", act_format=None).freeze()
    elif quant:
        model.quantize(quant)
    ids = torch.randint(0, 257, (2, 40))
    fast, taken = _steps(model, ids)
    assert taken == 4
    assert torch.equal(fast, _chain(model, ids))


@pytest.mark.parametrize("storage,page_size", [("mxint8", None), ("native", 8), ("mxint8", 8)])
def test_cache_layouts(storage, page_size):
    torch.manual_seed(1)
    model = Transformer(_cfg(n_kv_heads=3), dtype=torch.bfloat16).eval().quantize("mxint4")
    ids = torch.randint(0, 257, (3, 40))
    fast, taken = _steps(model, ids, storage, page_size)
    assert taken == 4
    assert torch.equal(fast, _chain(model, ids, storage=storage, page_size=page_size))


def test_matches_the_module_chain():
    """Against the unfused module chain (different rounding points: close, not equal)."""
    torch.manual_seed(2)
    model = Transformer(_cfg()).eval()
    ids = torch.randint(0, 257, (2, 40))
    fast, _ = _steps(model, ids)
    model.fused_inference = False
    chain, taken = _steps(model, ids)
    assert taken == 0
    torch.testing.assert_close(fast, chain, rtol=2e-5, atol=2e-5)


def test_plan_follows_the_model():
    torch.manual_seed(3)
    model = Transformer(_cfg()).eval()
    ids = torch.randint(0, 257, (1, 40))
    _steps(model, ids)
    plan = model._plan
    assert plan.covered
    _steps(model, ids)
    assert model._plan is plan  # reused
    with torch.no_grad():  # in-place updates need no new plan and are seen
        model.layers[2].post_attention_layernorm.weight.mul_(1.5)
        model.layers[0].mlp.down_proj.weight.mul_(-1)
    fast, _ = _steps(model, ids)
    assert model._plan is plan
    assert torch.equal(fast, _chain(model, ids))
    model.quantize("mxint8")  # new modules: a new plan
    fast, taken = _steps(model, ids)
    assert taken == 4 and model._plan is not plan
    assert torch.equal(fast, _chain(model, ids))
    plan = model._plan
    model.layers[1].self_attn.o_proj = tf.BFPLinear.from_linear(
        nn.Linear(96, 96, bias=False), "mxint4").freeze()
    fast, _ = _steps(model, ids)
    assert model._plan is not plan
    assert torch.equal(fast, _chain(model, ids))


def test_models_it_does_not_cover_take_the_chain():
    class MyBlock(tf.Block):
        pass

    torch.manual_seed(4)
    model = Transformer(_cfg()).eval()
    ids = torch.randint(0, 257, (1, 30))
    model.layers[1].__class__ = MyBlock  # a block the op knows nothing of
    _, taken = _steps(model, ids)
    assert taken == 0 and not model._plan.covered
    model.layers[1].__class__ = tf.Block
    model.layers[2].mlp.gate_proj = tf.BFPLinear.from_linear(  # trainable: a master weight
        nn.Linear(96, 200, bias=False), "mxint8", trainable=True)
    _, taken = _steps(model, ids)
    assert taken == 0
    model.layers[2].mlp.gate_proj = nn.Linear(96, 200, bias=False, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):  # a dense weight of another dtype: the chain raises
        _steps(model, ids)
    model.layers[2].mlp.gate_proj.to(torch.float32)  # converted in place: seen
    _, taken = _steps(model, ids)
    assert taken == 4
    model.layers[0].self_attn.v_proj.to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        _steps(model, ids)


def test_not_taken_with_grad_or_autocast():
    torch.manual_seed(5)
    model = Transformer(_cfg()).eval()
    ids = torch.randint(0, 257, (1, 12))
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(ids[:, :8], cache=cache, prefill=True)
    x = torch.zeros(1, 1, 96)
    with torch.enable_grad():
        assert model._decoder_layers(x, x, x, cache) is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._decoder_layers(x, x, x, cache) is None


def _op_args(model, cache, x, cos, sin):
    return [x, cos, sin, model._plan.weights, cache.k_values, cache.v_values,
            cache.k_exponents, cache.v_exponents, cache._seq, cache._table, 0.25]


def _weights_args(model):
    p, c = model._plan, model.config
    return [p.norm_weight, p.eps, p.linear, p.linear_spec, c.n_heads, c.n_kv_heads]


def test_errors_name_the_argument_and_layer():
    torch.manual_seed(6)
    model = Transformer(_cfg(n_heads=4, n_kv_heads=4, dim=64, ffn_dim=96)).eval()
    model = model.quantize("mxint8")
    _steps(model, torch.randint(0, 257, (1, 30)))
    cache = model.new_cache(1, 32)
    x, cs = torch.zeros(1, 1, 64), torch.zeros(1, 1, 16)
    op = torch.ops.llmcore.decoder_layers
    args = _op_args(model, cache, x, cs, cs)
    assert op(*args).shape == (1, 1, 64)
    assert model._plan.weights.n_layers() == 3
    make = torch.classes.llmcore.DecoderWeights
    w = _weights_args(model)
    for i, value, pattern in [
            (0, w[0][:-1], "norm_weight must hold 2 \\* layers \\+ 1"),
            (2, w[2][:-3], "linear must hold 63 entries"),
            (3, w[3][:-1], "linear_spec must hold 84 ints"),
            (3, w[3][:4 * 7] + [7] + w[3][4 * 7 + 1:], "layer 1 q_proj: kind must be"),
            (2, w[2][:3 * 10] + [None] + w[2][3 * 10 + 1:], "layer 1 o_proj: the weight is None"),
            (2, w[2][:3 * 10 + 1] + [None] + w[2][3 * 10 + 2:], "layer 1 o_proj: a BFP weight "
                                                             "needs its exponent"),
            (5, 3, "n_heads must be a positive multiple of n_kv_heads")]:
        bad = list(w)
        bad[i] = value
        with pytest.raises(ValueError, match=pattern):
            make(*bad)
    bad = list(w)
    bad[2] = list(w[2])
    bad[2][3 * (7 * 2 + 6)] = torch.zeros(3, 3, dtype=torch.int8)  # layer 2, down_proj
    args[3] = make(*bad)
    with pytest.raises(ValueError, match="layer 2, down_proj"):
        op(*args)
    args[3] = model._plan.weights
    bad = list(args)
    bad[0] = torch.zeros(1, 1, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        op(*bad)
    bad = list(args)
    bad[4] = cache.k_values[:2]
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        op(*bad)
    assert cache.lengths == [0]


def test_writes_only_the_cache():
    """What the schema says: the op writes the caches (the new positions only) and nothing
    else, and its output is a new tensor. (torch.library.opcheck cannot take the
    DecoderWeights argument.)"""
    torch.manual_seed(7)
    model = Transformer(_cfg(n_heads=4, n_kv_heads=2, dim=64, ffn_dim=96)).eval()
    model = model.quantize("mxint8")
    _steps(model, torch.randint(0, 257, (1, 30)))
    weights = [t.clone() for t in model._plan.norm_weight]
    weights += [t.clone() for t in model._plan.linear if t is not None]
    for storage in ("native", "mxint8"):
        cache = model.new_cache(1, 32, storage=storage)
        cache.prepare(3)
        cache.commit()  # 3 positions hold something
        cache.prepare(2)
        x, cs = torch.randn(1, 2, 64), torch.randn(1, 2, 16)
        sn = cs.cos()
        ins = [t.clone() for t in (x, cs, sn, cache._seq)]
        bufs = [t for t in (cache.k_values, cache.v_values, cache.k_exponents,
                            cache.v_exponents) if t is not None]
        before = [t.clone() for t in bufs]
        out = torch.ops.llmcore.decoder_layers(*_op_args(model, cache, x, cs, sn))
        assert all(torch.equal(a, b) for a, b in zip(ins, (x, cs, sn, cache._seq), strict=True))
        for b, t in zip(before, bufs, strict=True):
            assert torch.equal(b[:, :, :3], t[:, :, :3]) and torch.equal(b[:, :, 5:], t[:, :, 5:])
            assert not torch.equal(b[:, :, 3:5], t[:, :, 3:5])
        assert all(out.data_ptr() != t.data_ptr() for t in (x, *bufs))
    now = [t for t in model._plan.norm_weight]
    now += [t for t in model._plan.linear if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(weights, now, strict=True))


def test_copies_build_their_own_plan():
    import copy
    import pickle

    torch.manual_seed(8)
    model = Transformer(_cfg()).eval().quantize("mxint8")
    ids = torch.randint(0, 257, (1, 30))
    fast, _ = _steps(model, ids)
    twin = copy.deepcopy(model)
    assert twin._plan is None
    out, taken = _steps(twin, ids)
    assert taken == 4 and torch.equal(out, fast)
    assert twin._plan.weights is not model._plan.weights
    assert pickle.loads(pickle.dumps(model._plan)) is None
