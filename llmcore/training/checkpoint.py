"""Checkpoints: written atomically, read back exactly, no pickles.

``checkpoints/step_N/`` holds

* the model as a Hugging Face directory (``config.json``, ``model.safetensors``, the
  tokenizer files): ``Transformer.from_pretrained``, ``llmcore generate --model`` and
  transformers' ``AutoModelForCausalLM`` all load it. BFP-trained models are saved with
  their fp32 master weights;
* ``optimizer.safetensors`` (every moment tensor, by parameter index) and
  ``trainer_state.json`` (step, tokens, the optimizer's param groups, the Python RNG
  state, the data position, the resolved config);
* ``rng.safetensors`` (torch CPU and CUDA generator states).

A checkpoint is built in a hidden temporary directory beside its final place, every file
fsynced, then renamed into place: a crash at any moment leaves the previous checkpoint
whole, and a half-written one is never mistaken for a checkpoint (it has a hidden name
and is removed on the next save). ``keep_last`` prunes the oldest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcore._io import atomic_directory

STATE_FILE = "trainer_state.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as full CPU tensors (gathered when FSDP-sharded)."""
    model = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_model(model: nn.Module, path: str | os.PathLike,
                 tokenizer_dir: str | os.PathLike | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` (a Transformer, possibly wrapped, sharded or BFP-trainable) into
    ``path`` as a plain Hugging Face directory with fp32 (or its own dtype) weights."""
    from llmcore.models import Transformer

    model = unwrap(model)
    state = full_state_dict(model) if state is None else state
    if hasattr(model, "export_pretrained"):  # a composite model writes its own layout
        model.export_pretrained(Path(path), state)
        _copy_tokenizer(tokenizer_dir, path)
        return
    cls = type(model) if isinstance(model, Transformer) else Transformer  # or a RewardModel
    plain = cls(model.config, backend=model.backend, device="cpu",
                dtype=model.embed_tokens.weight.dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"cannot export the model: missing {missing}, unexpected {unexpected}")
    plain.save_pretrained(str(path))
    _copy_tokenizer(tokenizer_dir, path)


def _copy_tokenizer(tokenizer_dir, path) -> None:
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, Path(path) / name)


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a checkpoint directory atomically; ``state`` is JSON (step, tokens, ...)."""
    path = Path(path)
    opt = optimizer.state_dict()
    tensors = {}
    for idx, slots in opt["state"].items():
        for key, t in slots.items():
            tensors[f"{idx}.{key}"] = (t if isinstance(t, torch.Tensor)
                                       else torch.tensor(t)).detach().cpu().contiguous()
    with atomic_directory(path) as tmp:
        export_model(model, tmp, tokenizer_dir)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        full = {**state, "param_groups": opt["param_groups"], "python_rng": _python_rng()}
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Load weights (and optimizer moments, RNG states) from checkpoint ``path`` into
    ``model`` / ``optimizer`` in place; returns the trainer state."""
    path = Path(path)
    sf = path / STATE_FILE
    if not sf.is_file():
        raise FileNotFoundError(f"{sf} not found: {path} is not a complete checkpoint")
    state = json.loads(sf.read_text(encoding="utf-8"))
    load_model_weights(model, path)
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        slots: dict[int, dict] = {}
        for key, t in tensors.items():
            idx, _, name = key.partition(".")
            slots.setdefault(int(idx), {})[name] = t
        optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    if restore_rng:
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        v, internal, gauss = state["python_rng"]
        random.setstate((v, tuple(internal), gauss))
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the weights of HF directory ``path`` into ``model`` (exact; names checked)."""
    model = unwrap(model)
    if hasattr(model, "load_pretrained_weights"):  # a composite model reads its own layout
        model.load_pretrained_weights(Path(path))
        return
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found")
    tensors = {k[len("model."):] if k.startswith("model.") else k: v
               for k, v in load_file(str(f)).items()}
    own = model.state_dict()
    if model.config.tie_embeddings and "lm_head.weight" in own:
        tensors.setdefault("lm_head.weight", tensors.get("embed_tokens.weight"))
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{f} does not match the model: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}")
    with torch.no_grad():
        for k, t in own.items():
            if tuple(t.shape) != tuple(tensors[k].shape):
                raise ValueError(f"{f}: {k} has shape {list(tensors[k].shape)}, the model "
                                 f"{list(t.shape)}")
            t.copy_(tensors[k])


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith("step_") and (d / STATE_FILE).is_file():
            try:
                found.append((int(d.name[len("step_"):]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints, and stale temporaries."""
    root = Path(run_dir) / "checkpoints"
    for d in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(d)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".step_"):
                shutil.rmtree(d, ignore_errors=True)
