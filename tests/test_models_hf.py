"""Hugging Face checkpoints: logits parity with transformers, save/load, errors, tokenizer."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmcore.models.transformer import Transformer  # noqa: E402
from llmcore.tokenizer import load_tokenizer  # noqa: E402

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, intermediate_size=96, max_position_embeddings=128)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM",
                    {"rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}}),
    "tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
}


def make_hf(kind, seed=0):
    cfg_cls, model_cls, kw = CASES[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for kind in CASES:
        d = tmp_path_factory.mktemp(kind)
        m = make_hf(kind)
        m.save_pretrained(d, safe_serialization=True)
        out[kind] = (m, d)
    return out


def hf_logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 127, 40, 8, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("backend", ["llmcore", "torch"])
def test_prefill_and_decode_match_transformers(saved, kind, backend):
    hf, d = saved[kind]
    model = Transformer.from_pretrained(d, backend=backend)
    assert model.dtype == torch.float32
    ref = hf_logits(hf, IDS)
    with torch.no_grad():
        got = model(IDS)
        assert (got - ref).abs().max().item() < 1e-4
        # prefill 6 tokens into the cache, then decode one token at a time
        cache = model.new_cache(IDS.shape[0], 32)
        out = model(IDS[:, :6], cache=cache)
        assert (out - ref[:, :6]).abs().max().item() < 1e-4
        for t in range(6, IDS.shape[1]):
            step = model(IDS[:, t:t + 1], cache=cache)
            full = hf_logits(hf, IDS[:, :t + 1])[:, -1:]
            assert (step - full).abs().max().item() < 1e-4, (kind, backend, t)


def test_sharded_checkpoint(tmp_path):
    hf = make_hf("qwen2", seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (model(IDS) - hf_logits(hf, IDS)).abs().max().item() < 1e-4


def test_save_pretrained_round_trip(saved, tmp_path):
    hf, d = saved["qwen2"]
    model = Transformer.from_pretrained(d)
    out = tmp_path / "out"
    model.save_pretrained(out)
    again = Transformer.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert (hf_logits(back, IDS) - hf_logits(hf, IDS)).abs().max().item() < 1e-5

    hf_t, d_t = saved["llama3_rope"]  # rope scaling survives the round trip
    m = Transformer.from_pretrained(d_t)
    m.save_pretrained(tmp_path / "rope")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rope").eval()
    assert (hf_logits(back, IDS) - hf_logits(hf_t, IDS)).abs().max().item() < 1e-4


def test_tied_round_trip(saved, tmp_path):
    hf, d = saved["tied"]
    model = Transformer.from_pretrained(d)
    assert model.lm_head.weight is model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf_logits(back, IDS) - hf_logits(hf, IDS)).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind,fmt", [("llama", "mxint8"), ("tied", "mxint8"), ("tied", "mxint4")])
def test_quantized_load_and_round_trip(saved, kind, fmt, tmp_path):
    from llmcore.nn.bfp_linear import BFPLinear

    hf, d = saved[kind]
    model = Transformer.from_pretrained(d, quantize=fmt)
    assert isinstance(model.layers[0].self_attn.q_proj, BFPLinear)
    assert model.layers[0].self_attn.q_proj.format.name == fmt
    assert isinstance(model.lm_head, BFPLinear) and model.lm_head.format.name == "mxint8"
    ref = hf_logits(hf, IDS)
    with torch.no_grad():
        got = model(IDS)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (5e-2 if fmt == "mxint8" else 0.3), rel
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["llmcore_quantization"]["format"] == fmt
    again = Transformer.from_pretrained(tmp_path)
    assert isinstance(again.layers[1].mlp.down_proj, BFPLinear)
    assert again.layers[1].mlp.down_proj.format.name == fmt
    assert again.lm_head.format.name == "mxint8"
    with torch.no_grad():
        assert torch.equal(again(IDS), got)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(ValueError, match="already BFP"):
        Transformer.from_pretrained(tmp_path, quantize="mxint8")


def test_dtype_and_device_options(saved):
    _, d = saved["llama"]
    m = Transformer.from_pretrained(d, dtype=torch.bfloat16, device="cpu")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    assert m.inv_freq.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_error_unsupported_architecture(saved, tmp_path):
    d = _copy(saved["llama"][1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        Transformer.from_pretrained(d)


def test_error_missing_config(saved, tmp_path):
    d = _copy(saved["llama"][1], tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_error_pickle_only(saved, tmp_path):
    d = _copy(saved["llama"][1], tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        Transformer.from_pretrained(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(d)


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def test_error_missing_and_unexpected_tensor(saved, tmp_path):
    d = _copy(saved["llama"][1], tmp_path / "m")
    _rewrite(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: layers\.1\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(d)
    _rewrite(d, lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(96, 64),
                                      "model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: extra\.weight"):
        Transformer.from_pretrained(d)


def test_error_wrong_shape(saved, tmp_path):
    d = _copy(saved["llama"][1], tmp_path / "m")
    _rewrite(d, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \[65\], expected \[64\]"):
        Transformer.from_pretrained(d)


def test_error_missing_config_field(saved, tmp_path):
    d = _copy(saved["llama"][1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'hidden_size'"):
        Transformer.from_pretrained(d)


def test_mistral_sliding_window_warns(saved, tmp_path):
    d = _copy(saved["mistral"][1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    from llmcore.models import hf as hfmod

    hfmod._warned_sliding.clear()
    with pytest.warns(UserWarning, match="sliding_window=16"):
        m = Transformer.from_pretrained(d)
    assert m.config.extra["sliding_window"] == 16


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------
def test_tokenizer_and_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world", "how", "are", "you", "<|user|>",
             "<|assistant|>", "\n"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "bos_token": {"content": "<s>"}, "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"pad_token_id": 0}))
    t = load_tokenizer(tmp_path)
    assert (t.eos_token_id, t.bos_token_id, t.pad_token_id) == (2, 1, 0)
    ids = t.encode("hello world how are you")
    assert ids == [3, 4, 5, 6, 7]
    assert t.decode(ids) == "hello world how are you"
    assert t.decode([1, 3, 2]) == "hello"
    assert t.decode([1, 3, 2], skip_special_tokens=False) == "<s> hello </s>"
    text = t.apply_chat_template([{"role": "user", "content": "hello world"}])
    assert text == "<|user|> hello world </s> <|assistant|>"
    assert t.apply_chat_template([{"role": "user", "content": "hello"}],
                                 add_generation_prompt=False, tokenize=True) == [8, 3, 2]
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="chat_template"):
        load_tokenizer(tmp_path).apply_chat_template([])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "none")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "tied"])
def test_greedy_generate_equals_transformers_generate(saved, kind):
    """Greedy tokens equal transformers' own ``generate``: a left-padded batch with an eos
    id (rows that stop are padded with the pad id), and a single prompt run to the end."""
    from llmcore.generation import generate

    hf, d = saved[kind]
    model = Transformer.from_pretrained(d)
    hf.generation_config.eos_token_id = None  # only the eos passed below may stop a row
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3], [8, 64, 2, 127, 40, 8, 11]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    for eos in (None, int(hf(ids[1:], attention_mask=mask[1:]).logits[0, -1].argmax())):
        want = hf.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
        got = generate(model, ids, 24, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, want), (kind, eos)
    single = ids[1:]
    want = hf.generate(single, attention_mask=torch.ones_like(single), eos_token_id=None, **gen)
    assert torch.equal(generate(model, single, 24), want)
