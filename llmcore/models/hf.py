"""Hugging Face checkpoints: pure conversion between a local directory and a config plus
tensors. :meth:`Transformer.from_pretrained <llmcore.models.Transformer.from_pretrained>`
and ``save_pretrained`` build the model around these functions; nothing here imports the
model (tokenizers live in :mod:`llmcore.tokenizer`).

* :func:`read_checkpoint` reads a Llama/Mistral/Qwen2 directory: ``config.json`` and
  ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Only safetensors are
  read; pickled weights (``*.bin``, ``*.pt``) are refused, never unpickled. BFP-quantised
  checkpoints written by :func:`write_checkpoint` load back exactly.
* :func:`state_dict_from_checkpoint` names the tensors as a model's state_dict does and
  reports every mismatch.
* :func:`write_checkpoint` writes ``config.json`` (HF names, so ``transformers`` reads a
  non-quantised directory back) and ``model.safetensors`` (through
  :func:`llmcore.ops.save_bfp`: BFP weights as BFPTensors, recorded under
  ``llmcore_quantization`` in config.json), atomically as a pair: the directory is built
  beside the old one and renamed into place (other files in it are kept).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcore._io import atomic_directory, check_regular_file
from llmcore.formats import BFPFormat, get_format
from llmcore.models.config import MAX_SIZE, TransformerConfig, check_rope_scaling
from llmcore.ops.bfp import BFPTensor, index_bfp, load_bfp, read_bfp_tensor, save_bfp

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# Reward models: the same decoder with a scalar head ``score`` [1, hidden] in place of the
# language-model head (transformers' *ForSequenceClassification with num_labels = 1).
REWARD_ARCHITECTURES = {
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
}
_FAMILY = {**SUPPORTED_ARCHITECTURES, **REWARD_ARCHITECTURES}

# HF config keys mapped onto TransformerConfig fields (everything else goes to extra).
_KNOWN_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "head_dim",
    "attention_bias", "torch_dtype", "dtype", "llmcore_quantization",
}
INDEX_FILE = "model.safetensors.index.json"
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


def read_hf_config(path: str | os.PathLike, reward: bool = False) -> dict:
    """config.json of a local directory, checked for a supported architecture (a causal
    LM, or with ``reward=True`` a reward model)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a local Hugging Face "
                                "model directory; nothing is downloaded)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: a Hugging Face model directory needs "
                                "a config.json")
    check_regular_file(cfg_file, "config")
    d = _read_json(cfg_file)
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object, got a JSON {type(d).__name__}")
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{cfg_file}: field 'architectures' must be a list of names, got "
                         f"{archs!r}")
    if not archs:
        raise ValueError(f"{cfg_file}: field 'architectures' is missing; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = archs[0]
    if reward and arch not in REWARD_ARCHITECTURES:
        raise ValueError(f"{cfg_file}: architecture {arch!r} is not a reward model (field "
                         f"'architectures'); supported: {', '.join(REWARD_ARCHITECTURES)}")
    if not reward and arch in REWARD_ARCHITECTURES:
        raise ValueError(f"{cfg_file}: {arch} is a reward model, not a language model: load "
                         "it with llmcore.models.RewardModel.from_pretrained")
    if not reward and arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{cfg_file}: unsupported architecture {arch!r} (field "
                         f"'architectures'); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return d


def _req(d: dict, key: str, where: str):
    if d.get(key) is None:
        raise ValueError(f"{where}: required field {key!r} is missing")
    return d[key]


def _size(d: dict, key: str, where: str, default=None) -> int:
    """An integer field in [1, MAX_SIZE] (required when ``default`` is None)."""
    v = _req(d, key, where) if default is None else (d.get(key) or default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE:
        raise ValueError(f"{where}: field {key!r} must be an integer in [1, {MAX_SIZE}], "
                         f"got {v!r}")
    return v


def _positive(value, key: str, where: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: field {key!r} must be a finite number > 0, got {value!r}")
    return float(value)


def _rope(d: dict) -> tuple[object, dict | None]:
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
    return theta, scaling


def config_from_hf(d: dict, where: str = "config.json") -> TransformerConfig:
    """A TransformerConfig from a Hugging Face config dict; every field is range-checked
    and a bad one named by its Hugging Face key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must hold a JSON object, got a JSON {type(d).__name__}")
    arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
    family = _FAMILY.get(arch, "llama")
    theta, scaling = _rope(d)
    theta = _positive(theta, "rope_theta", where)
    try:
        check_rope_scaling(scaling, "rope_scaling")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    n_heads = _size(d, "num_attention_heads", where)
    bias = True if family == "qwen2" else d.get("attention_bias", False)
    head_dim = d.get("head_dim")
    extra = {k: v for k, v in d.items() if k not in _KNOWN_KEYS}
    flags = {"tie_word_embeddings": d.get("tie_word_embeddings", False), "attention_bias": bias}
    for key, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{where}: field {key!r} must be true or false, got {v!r}")
    try:
        cfg = TransformerConfig(
            dim=_size(d, "hidden_size", where),
            n_layers=_size(d, "num_hidden_layers", where),
            n_heads=n_heads,
            n_kv_heads=_size(d, "num_key_value_heads", where, default=n_heads),
            vocab_size=_size(d, "vocab_size", where),
            ffn_dim=_size(d, "intermediate_size", where),
            norm_eps=_positive(d.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=_size(d, "max_position_embeddings", where, default=2048),
            tie_embeddings=flags["tie_word_embeddings"],
            attention_bias=flags["attention_bias"],
            head_dim=None if head_dim is None else _size(d, "head_dim", where),
            extra=extra,
        )
    except ValueError as e:  # a relation between fields (heads, head_dim)
        raise ValueError(f"{where}: {e}") from None
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


def config_to_hf(cfg: TransformerConfig, dtype: torch.dtype, reward: bool = False) -> dict:
    """The Hugging Face config dict of a TransformerConfig (inverse of config_from_hf);
    ``reward``: the *ForSequenceClassification form (num_labels 1) of a reward model."""
    extra = dict(cfg.extra)
    arch = (extra.get("architectures") or [None])[0]
    family = _FAMILY.get(arch, "llama")
    if family == "qwen2" and not cfg.attention_bias:
        family = "llama"
    arch = next(a for a, f in (REWARD_ARCHITECTURES if reward else SUPPORTED_ARCHITECTURES
                               ).items() if f == family)
    d = {k: v for k, v in extra.items() if k not in _KNOWN_KEYS | {"id2label", "label2id",
                                                                    "num_labels"}}
    if reward:
        d.update({"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
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
    """The safetensors files of a directory, each checked to be a regular file (a named
    pipe would block the reader forever)."""
    index = path / INDEX_FILE
    single = path / "model.safetensors"
    if index.exists():
        check_regular_file(index, "index")
        d = _read_json(index)
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty")
        names = sorted(set(map(str, wm.values())))
        for n in names:
            if not n.endswith(".safetensors") or Path(n).name != n:
                raise ValueError(f"{index}: weight_map lists {n!r}; llmcore reads only "
                                 ".safetensors files beside the index (never pickles)")
        files = [path / n for n in names]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f} (listed in {index.name}) not found")
            check_regular_file(f, "weight file")
        return files
    if single.exists() or single.is_symlink():
        return [check_regular_file(single, "weight file")]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return [check_regular_file(f, "weight file") for f in others]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"{path} holds only pickled weights ({', '.join(pickled)}); llmcore "
                         "never unpickles checkpoints. Convert them to safetensors first (e.g. "
                         "load with transformers and save_pretrained(..., "
                         "safe_serialization=True)).")
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or "
                            f"{INDEX_FILE}")


def _header_shapes(f: Path) -> dict[str, list[int]]:
    """Tensor names and shapes of a safetensors file from its header alone (no tensor
    data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(f), framework="pt") as h:
            return {k: list(h.get_slice(k).get_shape()) for k in h.keys()}
    except Exception:  # not readable: load_bfp reports the problem with its file name
        load_bfp(f)
        raise


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, xs = [], sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out) or "none"


def check_shapes_before_loading(cfg: TransformerConfig, shapes: dict, where) -> None:
    """The checkpoint's tensor names and a few shapes (from the file headers) against the
    config, before any model is allocated: the layers held must be 0 .. n_layers-1 and the
    embedding, final norm and layer-0 tensors must have the config's shapes (a config that
    claims a million layers or a huge vocabulary fails here, in no time)."""
    names = [n.removeprefix("model.") for n in shapes]
    held = {int(m.group(1)) for n in names if (m := re.match(r"layers\.(\d+)\.", n))}
    if held != set(range(cfg.n_layers)):
        raise ValueError(f"checkpoint {where} does not match its config: num_hidden_layers is "
                         f"{cfg.n_layers} but the weights hold layers {_ranges(list(held))}")
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    want = {
        "embed_tokens.weight": [cfg.vocab_size, d], "norm.weight": [d],
        "layers.0.self_attn.q_proj.weight": [cfg.n_heads * hd, d],
        "layers.0.self_attn.k_proj.weight": [cfg.n_kv_heads * hd, d],
        "layers.0.self_attn.o_proj.weight": [d, cfg.n_heads * hd],
        "layers.0.mlp.gate_proj.weight": [f, d], "layers.0.mlp.down_proj.weight": [d, f],
    }
    got = {n.removeprefix("model."): s for n, s in shapes.items()}
    bad = [f"tensor {n!r} has shape {got[n]}, expected {w}" for n, w in want.items()
           if n in got and got[n] != w]
    if bad:
        raise ValueError(f"checkpoint {where} does not match its config.json: " + "; ".join(bad))


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


@dataclass
class Checkpoint:
    """What a Hugging Face directory holds, before any model is built.

    config       the TransformerConfig of config.json
    hf_config    config.json itself
    tensors      every tensor by name, without the ``model.`` prefix (BFP weights as
                 BFPTensors)
    quantized    {module name: BFPFormat} of the linears stored as BFP weights
    act_format   the activation format recorded for them (None: weight-only)
    sources      from :func:`open_checkpoint`: {name: (file, name in the file)}; ``tensors``
                 then holds placeholders on the meta device and :meth:`read` the data
    """

    config: TransformerConfig
    hf_config: dict
    tensors: dict
    quantized: dict = field(default_factory=dict)
    act_format: BFPFormat | str | None = None
    sources: dict = field(default_factory=dict)

    def read(self, name: str, device=None, dtype: torch.dtype | None = None):
        """Tensor ``name`` of a checkpoint from :func:`open_checkpoint`, read from its file
        now into memory of its own (a plain tensor as ``dtype`` if given)."""
        f, key = self.sources[name]
        return read_bfp_tensor(f, key, device if device is not None else "cpu", dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's ``torch_dtype`` (float32 when config.json names none)."""
        return _checkpoint_dtype(self.hf_config)


def _checked_header(path: Path, reward: bool):
    """(HF config, TransformerConfig, weight files) of a directory, with every shape in
    the files' headers checked against the config before any tensor data is read."""
    hf = read_hf_config(path, reward)
    cfg = config_from_hf(hf, str(path / "config.json"))
    files = _weight_files(path)
    check_shapes_before_loading(cfg, {n: s for f in files for n, s in _header_shapes(f).items()},
                                path)
    return hf, cfg, files


def read_checkpoint(path, device=None, reward: bool = False) -> Checkpoint:
    """Read config.json and the safetensors weights of a local directory (sharded or not)
    onto ``device`` (default CPU); see the module docstring. ``reward``: the directory
    holds a reward model (its ``score`` head is among the tensors)."""
    path = Path(path)
    hf, cfg, files = _checked_header(path, reward)
    tensors = _load_tensors(files, device)
    act = (hf.get("llmcore_quantization") or {}).get("act_format")
    quantized = {k.removesuffix(".weight"): v.format for k, v in tensors.items()
                 if isinstance(v, BFPTensor) and k.endswith(".weight")}
    return Checkpoint(cfg, hf, tensors, quantized,
                      _quant_format(act) if isinstance(act, dict) else act)


def open_checkpoint(path, reward: bool = False) -> Checkpoint:
    """:func:`read_checkpoint` without reading any tensor data: ``tensors`` are
    placeholders on the meta device (shapes, dtypes, BFP formats from the file headers,
    with every check :func:`read_checkpoint` makes) and :meth:`Checkpoint.read` reads one
    tensor at a time, so a model can be filled with one tensor of the file in memory."""
    path = Path(path)
    hf, cfg, files = _checked_header(path, reward)
    tensors: dict = {}
    sources: dict = {}
    for f in files:
        for k, v in index_bfp(f).items():
            name = k.removeprefix("model.")
            if name in tensors:
                raise ValueError(f"tensor {k!r} appears twice in the checkpoint ({f.name})")
            tensors[name], sources[name] = v, (f, k)
    act = (hf.get("llmcore_quantization") or {}).get("act_format")
    quantized = {k.removesuffix(".weight"): v.format for k, v in tensors.items()
                 if isinstance(v, BFPTensor) and k.endswith(".weight")}
    return Checkpoint(cfg, hf, tensors, quantized,
                      _quant_format(act) if isinstance(act, dict) else act, sources)


def _listed(names: list[str], what: str) -> str:
    more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
    return f"{what}: {', '.join(names[:20])}{more}"


def state_dict_from_checkpoint(ckpt: Checkpoint, expected: dict, tied: bool, where) -> dict:
    """The checkpoint's tensors named as ``expected`` (a model's state_dict) names them:
    BFP weights split into ``weight_mantissa`` / ``weight_exponent`` where the model holds a
    BFP linear, the head dropped when ``tied`` to the embedding, rotary buffers dropped
    (they are recomputed). Raises ValueError naming every missing, unexpected or
    misshapen tensor."""
    tensors = dict(ckpt.tensors)
    expected = dict(expected)
    for name in [k for k, v in tensors.items() if isinstance(v, BFPTensor)]:
        mod = name.removesuffix(".weight")
        if f"{mod}.weight_mantissa" in expected:
            q = tensors.pop(name)
            tensors[f"{mod}.weight_mantissa"] = q.mantissa
            tensors[f"{mod}.weight_exponent"] = q.exponent
    if tied:  # same storage as embed_tokens (a plain weight, or BFP mantissas/exponents)
        tensors.pop("lm_head.weight", None)
        for k in [k for k in expected if k.startswith("lm_head.weight")]:
            expected.pop(k)
    for k in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        tensors.pop(k)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(_listed(missing, "missing tensors"))
    if unexpected:
        problems.append(_listed(unexpected, "unexpected tensors"))
    for k in sorted(set(expected) & set(tensors)):
        if isinstance(tensors[k], BFPTensor):
            problems.append(f"tensor {k!r} is BFP-quantised but belongs to no linear layer")
        elif tuple(tensors[k].shape) != tuple(expected[k].shape):
            problems.append(f"tensor {k!r} has shape {list(tensors[k].shape)}, expected "
                            f"{list(expected[k].shape)}")
    if problems:
        raise ValueError(f"checkpoint {where} does not match the "
                         f"{ckpt.config.extra.get('architectures')} config: " + "; ".join(problems))
    return tensors


def write_checkpoint(path, config: TransformerConfig, dtype: torch.dtype, state_dict: dict,
                     quantized: dict | None = None, act_format: BFPFormat | None = None,
                     tied: bool = False, reward: bool = False) -> None:
    """Write ``config.json`` and ``model.safetensors`` (HF layout) into directory ``path``.

    ``state_dict`` uses the model's names; ``quantized`` maps the name of each BFP linear
    to its weight (a BFPTensor: written in place of its mantissa / exponent buffers and
    recorded under ``llmcore_quantization``); ``tied``: the head shares the embedding and
    is not written; ``reward``: a reward model (its ``score`` head written as is, the config
    a *ForSequenceClassification one)."""
    quantized = quantized or {}
    path = Path(path)
    tensors: dict = {}
    quant: dict = {}
    for name, t in state_dict.items():
        mod_name, _, leaf = name.rpartition(".")
        hf_name = name if name.startswith(("lm_head.", "score.")) else f"model.{name}"
        if tied and name.startswith("lm_head.weight"):  # the embedding's matrix
            continue
        if mod_name in quantized and leaf in ("weight_mantissa", "weight_exponent"):
            if leaf == "weight_mantissa":
                q = quantized[mod_name]
                tensors[hf_name.rpartition(".")[0] + ".weight"] = q
                if mod_name != "embed_tokens":  # the layers' format (listed before the head)
                    quant.setdefault("format", q.format.name)
                    quant.setdefault("mantissa_bits", q.format.mantissa_bits)
                    quant.setdefault("block_size", q.format.block_size)
            continue
        tensors[hf_name] = t.detach()
    if quantized:
        if act_format is not None:
            quant["act_format"] = {"format": act_format.name,
                                   "mantissa_bits": act_format.mantissa_bits,
                                   "block_size": act_format.block_size}
        quant["modules"] = list(quantized)
    hf = config_to_hf(config, dtype, reward)
    if quant:
        hf["llmcore_quantization"] = quant
    # Serialise the config first (a value JSON cannot encode fails here, before any write),
    # then build the new directory beside the old one and rename it into place: a failure
    # at any point leaves the old checkpoint whole, never old config + new weights.
    try:
        text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path / 'config.json'}: the config holds a value "
                         f"JSON cannot encode ({e}); nothing was written") from None
    # a stale index would shadow the new single file
    with atomic_directory(path, keep_existing=True, exclude=(INDEX_FILE,)) as tmp:
        save_bfp(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(text, encoding="utf-8")
