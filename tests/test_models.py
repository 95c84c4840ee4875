"""TransformerConfig presets, the Transformer on both backends, cached decoding, quantising."""

import pytest
import torch

from llmcore.models import PRESETS, Transformer, TransformerConfig
from llmcore.models.transformer import rope_inv_freq
from llmcore.nn import BFPEmbedding
from llmcore.ops import bfp_quantize


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pair(cfg, dtype=torch.float32):
    a = Transformer(cfg, dtype=dtype)
    b = Transformer(cfg, backend="torch", dtype=dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def test_presets_and_param_counts():
    assert set(PRESETS) >= {"tiny", "124M", "1B", "7B"}
    assert abs(PRESETS["124M"].num_params() - 124e6) / 124e6 < 0.1
    assert abs(PRESETS["1B"].num_params() - 1.24e9) / 1.24e9 < 0.05  # Llama-3.2-1B
    assert abs(PRESETS["7B"].num_params() - 7.24e9) / 7.24e9 < 0.05  # Mistral-7B
    cfg = TransformerConfig.from_name("tiny", n_layers=3)
    m = Transformer(cfg)
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params()
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.from_name("13B")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        TransformerConfig(n_heads=4, n_kv_heads=3)


def test_backends_agree_dense():
    a, b = _pair(TransformerConfig.from_name("tiny"))
    ids = torch.randint(0, 256, (3, 37))
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["llmcore", "torch"])
def test_cached_steps_equal_dense(backend):
    cfg = TransformerConfig.from_name("tiny")
    a, b = _pair(cfg)
    model = a if backend == "llmcore" else b
    ids = torch.randint(0, 256, (2, 20))
    full = model(ids)
    cache = model.new_cache(2, 32)
    parts = [model(ids[:, s:e], cache=cache) for s, e in ((0, 11), (11, 12), (12, 16), (16, 20))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [20, 20]


@pytest.mark.parametrize("storage,page_size", [("native", 8), ("mxint8", None), ("mxint8", 5)])
def test_cache_storages(storage, page_size):
    cfg = TransformerConfig.from_name("tiny")
    m = Transformer(cfg)
    ids = torch.randint(0, 256, (2, 24))
    full = m(ids)
    cache = m.new_cache(2, 40, storage=storage, page_size=page_size)
    out = torch.cat([m(ids[:, :16], cache=cache)] + [m(ids[:, i:i + 1], cache=cache)
                                                    for i in range(16, 24)], 1)
    if storage == "native":
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    else:  # MXINT8 K/V: close, not equal
        assert ((out - full).norm() / full.norm()).item() < 2e-2


def test_rollback_then_continue_equals_never_appended():
    m = Transformer(TransformerConfig.from_name("tiny"))
    ids = torch.randint(0, 256, (2, 12))
    c1 = m.new_cache(2, 32)
    m(ids[:, :8], cache=c1)
    m(torch.randint(0, 256, (2, 3)), cache=c1)  # rejected draft tokens
    c1.rollback([8, 8])
    out1 = m(ids[:, 8:], cache=c1)
    c2 = m.new_cache(2, 32)
    m(ids[:, :8], cache=c2)
    torch.testing.assert_close(out1, m(ids[:, 8:], cache=c2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_gives_the_computed_values(head_dim, dtype):
    """A CPU forward reads cos / sin from a table built once (``end`` given): the values
    computed per call, bit for bit where torch's vectorised cos covers both (rows of a
    multiple of 32 elements), within 1e-6 elsewhere (its scalar tail); the table grows
    with ``end`` and is rebuilt when ``inv_freq`` is replaced."""
    cfg = TransformerConfig(dim=2 * head_dim, n_heads=2, n_layers=1, vocab_size=64,
                            max_seq_len=512, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    model = Transformer(cfg)
    for positions, end in ((torch.tensor([[7]]), 8), (torch.randint(0, 40, (3, 5)), 40),
                           (torch.tensor([[0, 1, 2], [300, 301, 302]]), 303)):
        got = model.rope(positions, dtype, end)
        want = model.rope(positions, dtype)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape == (*positions.shape, head_dim) and g.dtype == dtype
            if head_dim % 32 == 0:
                assert torch.equal(g, w)
            else:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6 if dtype == torch.float32
                                           else 8e-3)
        assert model._rope_table[1].shape[0] >= end
    table = model._rope_table
    model.inv_freq = rope_inv_freq(cfg)  # replaced: a new table
    model.rope(torch.tensor([[3]]), dtype, 4)
    assert model._rope_table is not table


def test_rope_scaling_llama3_changes_low_frequencies_only():
    base = TransformerConfig(dim=64, n_heads=2, rope_theta=500000.0)
    scaled = TransformerConfig(dim=64, n_heads=2, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192})
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[:4], b[:4])  # high frequencies untouched
    torch.testing.assert_close(b[-1], a[-1] / 8.0)  # lowest frequency divided by the factor
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        rope_inv_freq(TransformerConfig(dim=64, n_heads=2, rope_scaling={"rope_type": "yarn"}))


def test_qkv_bias_and_tied_embeddings():
    cfg = TransformerConfig.from_name("tiny", attention_bias=True, tie_embeddings=True)
    a, b = _pair(cfg)
    assert a.layers[0].self_attn.q_proj.bias is not None
    assert a.lm_head.weight is a.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)


def test_quantized_model_close_and_smaller():
    cfg = TransformerConfig.from_name("tiny", dim=128, ffn_dim=256, n_heads=4, n_kv_heads=2)
    m = Transformer(cfg)
    ids = torch.randint(0, 256, (2, 16))
    ref = m(ids)
    m.quantize("mxint8")
    from llmcore.nn import BFPLinear

    assert isinstance(m.layers[0].mlp.up_proj, BFPLinear)
    assert isinstance(m.lm_head, BFPLinear) and m.lm_head.format.name == "mxint8"
    out = m(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2
    cache = m.new_cache(2, 32)
    torch.testing.assert_close(torch.cat([m(ids[:, :10], cache=cache), m(ids[:, 10:], cache=cache)], 1),
                               out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,head,want", [("mxint4", "auto", "mxint8"), ("mxint4", "mxint4", "mxint4"),
                                           ("mxint8", None, None), ("msfp12", "auto", "mxint8")])
def test_quantize_head_options(fmt, head, want):
    from llmcore.nn import BFPLinear

    cfg = TransformerConfig.from_name("tiny", tie_embeddings=True)
    m = Transformer(cfg)
    ids = torch.randint(0, 256, (1, 12))
    ref = m(ids)
    m.quantize(fmt, lm_head=head)
    assert m.layers[1].self_attn.o_proj.format.name == fmt
    if want is None:
        assert type(m.lm_head) is torch.nn.Linear
        assert m.lm_head.weight is m.embed_tokens.weight  # still tied
    else:
        assert isinstance(m.lm_head, BFPLinear) and m.lm_head.format.name == want
        # the table is stored in the head's format: one BFP matrix for the two
        assert isinstance(m.embed_tokens, BFPEmbedding) and m.head_tied()
        assert m.embed_tokens.weight_mantissa is m.lm_head.weight_mantissa
    assert ((m(ids) - ref).norm() / ref.norm()).item() < 0.3


@pytest.mark.parametrize("tie", [True, False])
def test_quantize_embedding_options(tie):
    from llmcore.nn import BFPLinear

    cfg = TransformerConfig.from_name("tiny", tie_embeddings=tie)
    base = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (2, 7))
    keep = base.quantized("mxint4")  # embedding=None: the lookup stays exact, the head a copy
    assert type(keep.embed_tokens) is torch.nn.Embedding and not keep.head_tied()
    assert isinstance(keep.lm_head, BFPLinear)
    m = Transformer(cfg).eval()
    m.load_state_dict(base.state_dict())
    m.quantize("mxint4")
    assert isinstance(m.embed_tokens, BFPEmbedding) and m.embed_tokens.format.name == "mxint8"
    assert m.head_tied() == tie
    # the lookup is the quantised table's rows, whatever the head
    q = bfp_quantize(base.embed_tokens.weight.detach(), "mxint8").dequantize()
    torch.testing.assert_close(m.embed_tokens(ids), q[ids], rtol=0, atol=0)
    with torch.no_grad():  # the same model but for the table's rounding
        x, y = m(ids), keep(ids)
    assert 0 < ((x - y).norm() / y.norm()).item() < 0.3
    forced = Transformer(cfg).eval().quantize("mxint8", embedding="mxint4")
    assert forced.embed_tokens.format.name == "mxint4" and not forced.head_tied()
    with pytest.raises(ValueError, match="format"):
        Transformer(cfg).quantize("mxint8", embedding="int3")
    full_head = Transformer(cfg).quantize("mxint8", lm_head=None)  # auto follows the head
    assert type(full_head.embed_tokens) is torch.nn.Embedding


def test_quantize_exclude():
    from llmcore.nn import BFPLinear

    m = Transformer(TransformerConfig.from_name("tiny"))
    m.quantize("mxint8", exclude=("*.mlp.*",), lm_head=None)
    assert type(m.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(m.layers[0].self_attn.q_proj, BFPLinear)
    with pytest.raises(ValueError, match="format"):
        Transformer(TransformerConfig.from_name("tiny")).quantize("mxint8", lm_head="int3")


@pytest.mark.parametrize("fmt,act,want", [("mxint8", "auto", "mxint8"), ("mxint4", "auto", "mxint8"),
                                           ("msfp12", "auto", None), ("mxint8", None, None)])
def test_quantize_activation_format(fmt, act, want):
    """quantize() multiplies int8 activations by default where the weight has blocks of
    32; act_format=None keeps the exact weight-only product."""
    from llmcore.nn import BFPLinear
    from llmcore.nn.bfp_linear import bfp_linear_reference

    m = Transformer(TransformerConfig.from_name("tiny"))
    m.quantize(fmt, act_format=act)
    mod = m.layers[0].mlp.up_proj
    assert isinstance(mod, BFPLinear) and isinstance(m.lm_head, BFPLinear)
    assert (mod.act_format.name if mod.act_format else None) == want
    head_act = m.lm_head.act_format  # "auto" heads of 4-bit models are mxint8: int8 too
    assert (head_act is None) == (act is None)
    x = torch.randn(3, m.layers[0].mlp.up_proj.in_features)
    lin = m.layers[0].mlp.up_proj
    rel = ((lin(x) - bfp_linear_reference(x, lin)).norm() / lin(x).norm()).item()
    assert (rel < 1e-5) if want is None else (1e-5 < rel < 3e-2)


def test_bf16_model_runs_close_to_fp32():
    cfg = TransformerConfig.from_name("tiny")
    a = Transformer(cfg)
    h = Transformer(cfg, dtype=torch.bfloat16)
    h.load_state_dict({k: v.bfloat16() for k, v in a.state_dict().items()})
    ids = torch.randint(0, 256, (2, 16))
    ref = a(ids)
    out = h(ids).float()
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def test_errors():
    m = Transformer(TransformerConfig.from_name("tiny", max_seq_len=16))
    with pytest.raises(ValueError, match="backend"):
        Transformer(TransformerConfig.from_name("tiny"), backend="jax")
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
    cache = m.new_cache(2, 8)
    with pytest.raises(ValueError, match="sequences"):
        m(torch.zeros(3, 2, dtype=torch.long), cache=cache)
    m(torch.zeros(2, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    assert cache.lengths == [6, 6]  # a failed step leaves the cache as it was
    t = Transformer(TransformerConfig.from_name("tiny"), backend="torch")
    with pytest.raises(ValueError, match="float \\(not mxint8\\), non-paged"):
        t(torch.zeros(1, 2, dtype=torch.long), cache=t.new_cache(1, 8, storage="mxint8"))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", ["torch", "llmcore"])
def test_decode_step_compiles_to_one_graph(backend, compiler):
    """Transformer.step (the device work of a cached forward) traces as one graph
    (fullgraph: no host sync, no branch on the cache's lengths), is reused at every length
    (no recompile), and gives the eager logits; the cache advances on the device."""
    torch._dynamo.reset()
    m = Transformer(TransformerConfig.from_name("tiny"), backend=backend).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        ref = m(ids)
        cache = m.new_cache(2, 32)
        m(ids[:, :8], cache=cache, prefill=True)
        seqlens = cache.seqlens.data_ptr()
        m.step = torch.compile(m.step, fullgraph=True, backend=compiler)
        out = [m(ids[:, 8:9], cache=cache)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            out += [m(ids[:, i:i + 1], cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(out, 1), ref[:, 8:], rtol=1e-4, atol=1e-4)
    assert cache.lengths == [12, 12] and cache.seqlens.tolist() == [12, 12]
    assert cache.seqlens.data_ptr() == seqlens  # updated in place, never rebuilt
    torch._dynamo.reset()


def test_kv_cache_is_a_module_with_device_lengths():
    m = Transformer(TransformerConfig.from_name("tiny"))
    cache = m.new_cache(2, 16, page_size=4)
    assert isinstance(cache, torch.nn.Module)
    assert {"seqlens", "block_table", "k_values", "v_values"} <= dict(cache.named_buffers()).keys()
    assert cache.state_dict() == {}  # a cache is not part of a checkpoint
    m(torch.zeros(2, 5, dtype=torch.long), cache=cache, prefill=True)
    with pytest.raises(ValueError, match="empty cache"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=cache, prefill=True)
    assert cache.lengths == [5, 5] and cache.seqlens.tolist() == [5, 5]
    assert all(len(p) == 2 for p in cache._pages)  # a failed step gives its pages back


def test_truncated_and_quantized_share_what_they_can():
    from llmcore.nn import BFPLinear

    m = Transformer(TransformerConfig.from_name("tiny", n_layers=3, tie_embeddings=True))
    t = m.truncated(2)
    assert t.config.n_layers == 2 and t.layers[1] is m.layers[1] and t.lm_head is m.lm_head
    assert t.inv_freq is m.inv_freq and t.lm_head.weight is t.embed_tokens.weight
    q = m.quantized("mxint8", lm_head=None)
    assert q.embed_tokens is m.embed_tokens and q.lm_head.weight is m.embed_tokens.weight
    assert isinstance(q.layers[0].mlp.up_proj, BFPLinear)
    assert type(m.layers[0].mlp.up_proj) is torch.nn.Linear  # the original is untouched
    with pytest.raises(ValueError, match="n_layers"):
        m.truncated(3)
    with pytest.raises(ValueError, match="already quantised"):
        q.quantized()


# ---------------------------------------------------------------------------------------
# Bad input at the door: configs, token ids, cache layers
# ---------------------------------------------------------------------------------------
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
BAD_CONFIGS = {
    "norm_eps NaN": ({"norm_eps": float("nan")}, "norm_eps"),
    "norm_eps negative": ({"norm_eps": -1e-5}, "norm_eps"),
    "rope_theta 0": ({"rope_theta": 0.0}, "rope_theta"),
    "rope_theta inf": ({"rope_theta": float("inf")}, "rope_theta"),
    "linear factor 0": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    "llama3 without fields": ({"rope_scaling": {"rope_type": "llama3"}}, "llama3.*factor"),
    "llama3 high <= low": ({"rope_scaling": {**_LLAMA3, "high_freq_factor": 1.0}},
                           "high_freq_factor"),
    "rope_scaling a list": ({"rope_scaling": [1, 2]}, "rope_scaling"),
    "heads 0": ({"n_heads": 0}, "n_heads"),
    "kv heads negative": ({"n_kv_heads": -2}, "n_kv_heads"),
    "head_dim negative": ({"head_dim": -4}, "head_dim"),
    "head_dim odd": ({"head_dim": 7}, "head_dim"),
    "vocab 10**13": ({"vocab_size": 10**13}, "vocab_size"),
    "layers a float": ({"n_layers": 2.5}, "n_layers"),
    "dim a bool": ({"dim": True}, "dim"),
    "tie a string": ({"tie_embeddings": "yes"}, "tie_embeddings"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_rejects_bad_fields(case):
    fields, name = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=name):
        TransformerConfig(**{"dim": 64, "n_heads": 4, **fields})


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, "float32"])
def test_model_rejects_non_float_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        Transformer(TransformerConfig.from_name("tiny"), dtype=dtype)


@pytest.mark.parametrize("bad", [256, -1, 10**6])
def test_bad_token_id_leaves_the_cache_as_it_was(bad):
    """The id is checked before the cache is touched; the message names it and the
    vocabulary; the next valid step works and gives the same logits as a fresh cache."""
    m = Transformer(TransformerConfig.from_name("tiny"))
    ids = torch.randint(0, 256, (2, 6))
    with pytest.raises(ValueError, match=rf"{bad}.*vocabulary \[0, 256\)"):
        m(torch.tensor([[1, bad]]))
    c = m.new_cache(2, 16, page_size=4)
    m(ids[:, :4], cache=c)
    bad_ids = ids[:, 4:].clone()
    bad_ids[1, 1] = bad
    with pytest.raises(ValueError, match=rf"input_ids\[1, 1\] = {bad}"):
        m(bad_ids, cache=c)
    assert c.lengths == [4, 4] and c.seqlens.tolist() == [4, 4]
    out = m(ids[:, 4:], cache=c)
    fresh = m.new_cache(2, 16, page_size=4)
    m(ids[:, :4], cache=fresh)
    torch.testing.assert_close(out, m(ids[:, 4:], cache=fresh))


def test_kv_cache_layer_index_checked():
    m = Transformer(TransformerConfig.from_name("tiny"))
    c = m.new_cache(1, 8)
    c.prepare(1)
    q = torch.randn(1, 1, 4, 16)
    k = torch.randn(1, 1, 2, 16)
    for layer in (-1, 2, True, 1.0):
        with pytest.raises(ValueError, match="layer"):
            c.attend(layer, q)
        with pytest.raises(ValueError, match="layer"):
            c.append(layer, k, k)


def test_save_pretrained_is_atomic_across_files(tmp_path):
    """A config JSON cannot encode fails before anything is written: the old config,
    weights and the files beside them stay byte for byte, and no temporary is left."""
    path = tmp_path / "model"
    Transformer(TransformerConfig.from_name("tiny")).save_pretrained(str(path))
    (path / "tokenizer.json").write_text("{}")
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    bad = Transformer(TransformerConfig.from_name("tiny", n_layers=1, extra={"x": {1, 2}}))
    with pytest.raises(ValueError, match="config.json.*JSON cannot encode"):
        bad.save_pretrained(str(path))
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a good save replaces config and weights together and keeps the tokenizer
    Transformer(TransformerConfig.from_name("tiny", n_layers=1)).save_pretrained(str(path))
    assert Transformer.from_pretrained(str(path)).config.n_layers == 1
    assert (path / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------------------
# Checkpoint directories checked at the door
# ---------------------------------------------------------------------------------------
@pytest.fixture
def saved_tiny(tmp_path):
    path = tmp_path / "tiny"
    Transformer(TransformerConfig.from_name("tiny")).save_pretrained(str(path))
    return path


def _edit_config(path, **fields):
    import json
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def test_from_pretrained_checks_layers_before_allocating(saved_tiny):
    import time
    _edit_config(saved_tiny, num_hidden_layers=1_000_000)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="num_hidden_layers is 1000000.*layers 0-1"):
        Transformer.from_pretrained(str(saved_tiny))
    assert time.perf_counter() - t0 < 5
    _edit_config(saved_tiny, num_hidden_layers=2, vocab_size=2**30)
    with pytest.raises(ValueError, match=r"embed_tokens.weight' has shape \[256, 64\]"):
        Transformer.from_pretrained(str(saved_tiny))


BAD_HF_CONFIGS = {
    "a JSON list": ([1, 2], "JSON object"),
    "heads 0": ({"num_attention_heads": 0}, "'num_attention_heads'"),
    "eps negative": ({"rms_norm_eps": -1e-6}, "'rms_norm_eps'"),
    "eps a string": ({"rms_norm_eps": "small"}, "'rms_norm_eps'"),
    "rope_theta 0": ({"rope_theta": 0}, "'rope_theta'"),
    "llama3 without fields": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                              "low_freq_factor"),
    "linear factor 0": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    "vocab 10**13": ({"vocab_size": 10**13}, "'vocab_size'"),
    "layers a list": ({"num_hidden_layers": [2]}, "'num_hidden_layers'"),
    "tie a string": ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings'"),
    "architectures a string": ({"architectures": "LlamaForCausalLM"}, "'architectures'"),
}


@pytest.mark.parametrize("case", list(BAD_HF_CONFIGS))
def test_hf_config_fields_checked(saved_tiny, case):
    import json
    change, pattern = BAD_HF_CONFIGS[case]
    if isinstance(change, dict):
        _edit_config(saved_tiny, **change)
    else:
        (saved_tiny / "config.json").write_text(json.dumps(change))
    with pytest.raises(ValueError, match=pattern):
        Transformer.from_pretrained(str(saved_tiny))


BAD_WEIGHTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated"),
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "absurd header length": (lambda p: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"),
                             "truncated"),
    "a pickle renamed": (lambda p: torch.save({"x": torch.zeros(1)}, p), "pickle"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_malformed_weight_file_named(saved_tiny, case):
    corrupt, why = BAD_WEIGHTS[case]
    corrupt(saved_tiny / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model.safetensors in .*tiny is not a valid "
                                         rf"safetensors file \(.*{why}"):
        Transformer.from_pretrained(str(saved_tiny))


def test_index_pointing_at_pickles_refused(saved_tiny):
    import json
    (saved_tiny / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "pytorch_model.bin"}}))
    with pytest.raises(ValueError, match="pytorch_model.bin.*never pickles"):
        Transformer.from_pretrained(str(saved_tiny))


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no named pipes")
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_non_regular_files_refused(saved_tiny, name):
    import os
    (saved_tiny / name).unlink()
    os.mkfifo(saved_tiny / name)  # opening it for reading would block forever
    with pytest.raises(ValueError, match="named pipe"):
        Transformer.from_pretrained(str(saved_tiny))


def test_logits_to_keep():
    """The head runs only where asked: the kept logits equal those of the full forward,
    with and without a cache, as the last n or as per-row positions; bad values fail."""
    torch.manual_seed(0)
    m = Transformer(TransformerConfig.from_name("tiny")).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full, h = m(ids), m.hidden_states(ids)
        # exactly the head of the kept rows; the full product may round differently (a BLAS
        # GEMM of 18 rows need not block like one of 6: it does not on AMD's Zen 4)
        kept = m(ids, logits_to_keep=3)
        torch.testing.assert_close(kept, m.lm_head(h[:, -3:]), rtol=0, atol=0)
        torch.testing.assert_close(kept, full[:, -3:], rtol=1e-5, atol=1e-6)
        pos = torch.tensor([[0, 8], [4, 4]])
        rows = torch.stack([h[0, [0, 8]], h[1, [4, 4]]])
        kept = m(ids, logits_to_keep=pos)
        torch.testing.assert_close(kept, m.lm_head(rows), rtol=0, atol=0)
        torch.testing.assert_close(kept, torch.stack([full[0, [0, 8]], full[1, [4, 4]]]),
                                   rtol=1e-5, atol=1e-6)
        cache = m.new_cache(2, 16)
        last = m(ids, cache=cache, prefill=True, logits_to_keep=1)
        assert last.shape == (2, 1, 256) and cache.lengths == [9, 9]
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    for bad in (-1, 1.5, True, torch.tensor([[9], [0]]), torch.tensor([0, 1]),
                torch.tensor([[0.0], [1.0]])):
        with pytest.raises(ValueError, match="logits_to_keep"):
            m(ids, logits_to_keep=bad)
