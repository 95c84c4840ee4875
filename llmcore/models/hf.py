"""Hugging Face checkpoints and tokenizers for :class:`~llmcore.models.Transformer`.

* :func:`load_pretrained` reads a local Llama/Mistral/Qwen2 directory: ``config.json`` and
  ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Only safetensors are
  read; pickled weights (``*.bin``, ``*.pt``) are refused, never unpickled. BFP-quantised
  checkpoints written by :func:`save_pretrained` load back exactly.
* :func:`save_pretrained` writes ``config.json`` (HF names, so ``transformers`` reads a
  non-quantised directory back) and ``model.safetensors`` atomically through
  :func:`llmcore.ops.save_bfp` (BFP weights as BFPTensors, recorded under
  ``llmcore_quantization`` in config.json).
* :func:`load_tokenizer` wraps ``tokenizers.Tokenizer`` with the special-token ids and the
  chat template of the directory.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from llmcore.formats import BFPFormat, get_format
from llmcore.models.config import TransformerConfig
from llmcore.ops.bfp import BFPTensor, load_bfp, save_bfp

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# HF config keys mapped onto TransformerConfig fields (everything else goes to extra).
_KNOWN_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "head_dim",
    "attention_bias", "torch_dtype", "dtype", "llmcore_quantization",
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_warned_sliding: set = set()


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of a local directory, checked for a supported architecture."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a local Hugging Face "
                                "model directory; nothing is downloaded)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: a Hugging Face model directory needs "
                                "a config.json")
    d = _read_json(cfg_file)
    archs = d.get("architectures") or []
    if not archs:
        raise ValueError(f"{cfg_file}: field 'architectures' is missing; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{cfg_file}: unsupported architecture {arch!r} (field "
                         f"'architectures'); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return d


def _req(d: dict, key: str, where: str):
    if d.get(key) is None:
        raise ValueError(f"{where}: required field {key!r} is missing")
    return d[key]


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the 4.x (rope_theta + rope_scaling) or the
    5.x (rope_parameters) layout."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and "rope_theta" not in params:
        # per-layer-type form ({"full_attention": {...}}); these models use one kind
        params = next((v for v in params.values() if isinstance(v, dict)), None)
    scaling = d.get("rope_scaling")
    if scaling is None and isinstance(params, dict):
        scaling = params
    theta = d.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None:
        theta = 10000.0
    if isinstance(scaling, dict):
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in (None, "default"):
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise ValueError(f"config.json: unsupported rope scaling type {kind!r} "
                             "(supported: default, linear, llama3)")
    else:
        scaling = None
    return float(theta), scaling


def config_from_hf(d: dict, where: str = "config.json") -> TransformerConfig:
    """A TransformerConfig from a Hugging Face config dict."""
    arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
    family = SUPPORTED_ARCHITECTURES.get(arch, "llama")
    theta, scaling = _rope(d)
    n_heads = int(_req(d, "num_attention_heads", where))
    bias = True if family == "qwen2" else bool(d.get("attention_bias", False))
    extra = {k: v for k, v in d.items() if k not in _KNOWN_KEYS}
    cfg = TransformerConfig(
        dim=int(_req(d, "hidden_size", where)),
        n_layers=int(_req(d, "num_hidden_layers", where)),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        vocab_size=int(_req(d, "vocab_size", where)),
        ffn_dim=int(_req(d, "intermediate_size", where)),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(d.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bias,
        head_dim=d.get("head_dim"),
        extra=extra,
    )
    sw = d.get("sliding_window")
    uses_sw = d.get("use_sliding_window", family == "mistral")
    if sw is not None and uses_sw and int(sw) < cfg.max_seq_len and arch not in _warned_sliding:
        _warned_sliding.add(arch)
        warnings.warn(f"{where}: sliding_window={sw} < max_position_embeddings="
                      f"{cfg.max_seq_len}; llmcore runs full attention, so outputs differ "
                      f"from sliding-window attention beyond {sw} tokens", stacklevel=3)
    return cfg


def _checkpoint_dtype(d: dict) -> torch.dtype:
    name = d.get("torch_dtype") or d.get("dtype") or "float32"
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"config.json: unsupported torch_dtype {name!r}")
    return dt


def config_to_hf(cfg: TransformerConfig, dtype: torch.dtype) -> dict:
    """The Hugging Face config dict of a TransformerConfig (inverse of config_from_hf)."""
    extra = dict(cfg.extra)
    arch = (extra.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        arch = "LlamaForCausalLM"
    if arch == "Qwen2ForCausalLM" and not cfg.attention_bias:
        arch = "LlamaForCausalLM"
    family = SUPPORTED_ARCHITECTURES[arch]
    d = {k: v for k, v in extra.items() if k not in _KNOWN_KEYS}
    d.update({
        "architectures": [arch],
        "model_type": family,
        "hidden_act": d.get("hidden_act", "silu"),
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.ffn_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "head_dim": cfg.head_dim,
        "torch_dtype": str(dtype).removeprefix("torch."),
    })
    if family != "qwen2":
        d["attention_bias"] = cfg.attention_bias
    return d


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty")
        files = [path / f for f in sorted(set(wm.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} (listed in {index.name}) not found")
        return files
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"{path} holds only pickled weights ({', '.join(pickled)}); llmcore "
                         "never unpickles checkpoints. Convert them to safetensors first (e.g. "
                         "load with transformers and save_pretrained(..., "
                         "safe_serialization=True)).")
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or "
                            "model.safetensors.index.json")


def _load_tensors(files: list[Path], device) -> dict:
    out: dict = {}
    for f in files:
        for k, v in load_bfp(f, device=device if device is not None else "cpu").items():
            name = k.removeprefix("model.")
            if name in out:
                raise ValueError(f"tensor {k!r} appears twice in the checkpoint ({f.name})")
            out[name] = v
    return out


def _quant_format(q: dict) -> BFPFormat:
    if "mantissa_bits" in q and "block_size" in q:
        return BFPFormat(q["format"], int(q["mantissa_bits"]), int(q["block_size"]))
    return get_format(q["format"])


def _build(cls, cfg, backend, device, dtype):
    with torch.device("meta"):
        model = cls(cfg, backend=backend, dtype=dtype)
    model = model.to_empty(device=device if device is not None else "cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    from llmcore.models.transformer import rope_inv_freq

    model.inv_freq = rope_inv_freq(cfg).to(model.embed_tokens.weight.device)
    with torch.no_grad():  # deterministic contents until the checkpoint overwrites them
        for p in model.parameters():
            p.zero_()
    return model


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device=None,
                    quantize: str | None = None, backend: str = "llmcore"):
    """Build ``cls`` (a Transformer) from a local Hugging Face directory; see module doc."""
    from llmcore.nn.bfp_linear import BFPLinear

    path = Path(path)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, str(path / "config.json"))
    dtype = dtype or _checkpoint_dtype(hf)
    files = _weight_files(path)
    tensors = _load_tensors(files, device)
    model = _build(cls, cfg, backend, device, dtype)

    # BFP checkpoint: quantise the linears that carry BFP weights, in their recorded format.
    qinfo = hf.get("llmcore_quantization") or {}
    act = qinfo.get("act_format")
    act_fmt = _quant_format(act) if isinstance(act, dict) else act
    bfp_names = [k for k, v in tensors.items() if isinstance(v, BFPTensor)]
    if bfp_names and quantize is not None:
        raise ValueError(f"{path} is already BFP-quantised; load it with quantize=None")
    for name in bfp_names:
        mod_name = name.removesuffix(".weight")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            continue  # reported as unexpected below
        if not name.endswith(".weight") or type(mod) is not nn.Linear:
            continue
        parent_name, _, child = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if mod_name == "lm_head" and cfg.tie_embeddings:
            mod.weight = nn.Parameter(mod.weight.detach().clone())
        setattr(parent, child, BFPLinear.from_linear(mod, tensors[name].format, act_fmt))
        q = tensors.pop(name)
        tensors[f"{mod_name}.weight_mantissa"] = q.mantissa
        tensors[f"{mod_name}.weight_exponent"] = q.exponent

    expected = model.state_dict()
    tied = cfg.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    if tied:
        tensors.pop("lm_head.weight", None)  # same storage as embed_tokens
        expected.pop("lm_head.weight", None)
    elif (cfg.tie_embeddings and type(model.lm_head) is nn.Linear
          and "lm_head.weight" not in tensors and "embed_tokens.weight" in tensors):
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    # Qwen2-style checkpoints may carry rotary buffers; they are recomputed.
    for k in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        tensors.pop(k)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}"
                        + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:20])}"
                        + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
    for k in sorted(set(expected) & set(tensors)):
        if tuple(tensors[k].shape) != tuple(expected[k].shape):
            problems.append(f"tensor {k!r} has shape {list(tensors[k].shape)}, expected "
                            f"{list(expected[k].shape)}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the {cfg.extra.get('architectures')}"
                         f" config: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)
    if quantize is not None:
        model.quantize(quantize)
    model.eval()
    return model


def save_pretrained(model, path) -> None:
    """Write ``config.json`` and ``model.safetensors`` (HF layout; BFP weights as
    BFPTensors) into directory ``path``."""
    from llmcore.nn.bfp_linear import BFPLinear

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors: dict = {}
    quant: dict = {}
    bfp_mods = {n: m for n, m in model.named_modules() if isinstance(m, BFPLinear)}
    tied = cfg.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    for name, t in model.state_dict().items():
        mod_name, _, leaf = name.rpartition(".")
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        if name == "lm_head.weight" and tied:
            continue
        mod = bfp_mods.get(mod_name)
        if mod is not None and leaf in ("weight_mantissa", "weight_exponent"):
            if leaf == "weight_mantissa":
                q = mod.qweight
                tensors[hf_name.rpartition(".")[0] + ".weight"] = q
                f = q.format
                quant.setdefault("format", f.name)
                quant.setdefault("mantissa_bits", f.mantissa_bits)
                quant.setdefault("block_size", f.block_size)
                if mod.act_format is not None:
                    a = mod.act_format
                    quant["act_format"] = {"format": a.name, "mantissa_bits": a.mantissa_bits,
                                           "block_size": a.block_size}
            continue
        tensors[hf_name] = t.detach()
    for n in bfp_mods:
        quant.setdefault("modules", []).append(n)
    hf = config_to_hf(cfg, model.embed_tokens.weight.dtype)
    if quant:
        hf["llmcore_quantization"] = quant
    save_bfp(tensors, path / "model.safetensors", metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():  # a stale index would shadow the new single file
        index.unlink()
    tmp = path / ".config.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path / "config.json")


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------
class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the directory's special tokens and chat template."""

    def __init__(self, tokenizer, config: dict | None = None, generation_config: dict | None = None,
                 model_config: dict | None = None):
        self.tokenizer = tokenizer
        self.config = config or {}
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        gen, mod = generation_config or {}, model_config or {}
        for kind in ("bos", "eos", "pad"):
            tok = self._token_str(self.config.get(f"{kind}_token"))
            setattr(self, f"{kind}_token", tok)
            tid = self.tokenizer.token_to_id(tok) if tok is not None else None
            if tid is None:
                tid = gen.get(f"{kind}_token_id", mod.get(f"{kind}_token_id"))
                if isinstance(tid, list):
                    tid = tid[0] if tid else None
            setattr(self, f"{kind}_token_id", tid)
        if self.eos_token is None and self.eos_token_id is not None:
            self.eos_token = self.tokenizer.id_to_token(self.eos_token_id)
        if self.bos_token is None and self.bos_token_id is not None:
            self.bos_token = self.tokenizer.id_to_token(self.bos_token_id)

    @staticmethod
    def _token_str(t):
        if isinstance(t, dict):
            return t.get("content")
        return t

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs):
        """Render ``messages`` with the chat template (a string, or ids if ``tokenize``)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json)")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from None

        def raise_exception(msg):
            raise ValueError(f"chat template error: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            undefined=jinja2.StrictUndefined
                                            if kwargs.pop("strict", False) else jinja2.Undefined)
        env.globals["raise_exception"] = raise_exception
        env.filters.setdefault("tojson", lambda x, **kw: json.dumps(x, **kw))
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(path) -> HFTokenizer:
    """The tokenizer of a local directory (tokenizer.json, via the ``tokenizers`` library)."""
    from tokenizers import Tokenizer

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{tj} not found (only the fast tokenizer.json format is "
                                "supported)")
    opt = {}
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
        f = path / name
        opt[name] = _read_json(f) if f.is_file() else None
    return HFTokenizer(Tokenizer.from_file(str(tj)), opt["tokenizer_config.json"],
                       opt["generation_config.json"], opt["config.json"])
