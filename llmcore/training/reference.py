"""Reference-model log-probabilities of preference pairs, computed once and cached.

Preference losses compare the policy with a frozen reference model. The reference's
sequence log-probs of every pair do not change during training, so they are computed in
one pass before training (TRL's ``precompute_ref_log_probs``) and the reference model is
then freed. They are cached on disk as safetensors under ``$LLMCORE_CACHE/ref_logps``,
keyed by a hash of the reference weights, the tokenised pairs (so the data, tokenizer,
chat template and truncation), the dtype and the backend: a second run on the same data
and model reads them back.

Each cache file holds ``chosen``, ``rejected`` (summed answer-token log-probs, fp32 [n])
and ``chosen_tokens``, ``rejected_tokens`` (int64 [n], for length-averaged losses).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from llmcore.training.batching import chunks, pair_batch
from llmcore.training.losses import packed_sequence_logprobs

KEYS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [2B], token counts [2B]) of a packed pair batch (chosen first, then rejected)."""
    logits = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
    return packed_sequence_logprobs(logits, batch["labels"], batch["cu_seqlens"])


@torch.no_grad()
def reference_logprobs(model: nn.Module, pairs: Sequence, batch_size: int,
                       autocast=contextlib.nullcontext, progress: bool = False
                       ) -> dict[str, torch.Tensor]:
    """The model's sequence log-probs of every pair (see the module doc for the keys)."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {k: [] for k in KEYS}
    try:
        for idx in tqdm(chunks(len(pairs), batch_size), disable=not progress,
                        desc="reference log-probs", unit="batch", dynamic_ncols=True):
            b = pair_batch(pairs, idx)
            with autocast():
                sums, counts = pair_logprobs(model, {k: v.to(device) for k, v in b.items()
                                                     if isinstance(v, torch.Tensor)})
            c, r = sums.float().cpu().chunk(2)
            cc, rc = counts.cpu().chunk(2)
            out["chosen"].append(c)
            out["rejected"].append(r)
            out["chosen_tokens"].append(cc)
            out["rejected_tokens"].append(rc)
    finally:
        model.train(was)
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def weights_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of a model directory's config.json and safetensors files."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for f in [d / "config.json", *sorted(d.glob("*.safetensors"))]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pairs_hash(pairs: Sequence) -> str:
    """sha256 of the tokenised pairs (ids and loss masks of both sides)."""
    h = hashlib.sha256()
    for p in pairs:
        for s in (p.chosen, p.rejected):
            h.update(json.dumps([s.ids, s.mask]).encode())
    return h.hexdigest()


def cache_path(model_dir, pairs: Sequence, dtype: str, backend: str) -> Path:
    from llmcore.data.prepare import cache_dir

    key = hashlib.sha256(json.dumps([weights_hash(model_dir), pairs_hash(pairs), dtype,
                                     backend, "ref-logps-v1"]).encode()).hexdigest()[:24]
    return cache_dir() / "ref_logps" / f"{key}.safetensors"


def load_or_compute(path: Path, compute) -> tuple[dict[str, torch.Tensor], bool]:
    """The cached tensors at ``path``, or ``compute()`` written there atomically; returns
    (tensors, whether they came from the cache)."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        try:
            t = load_file(str(path))
            if set(t) == set(KEYS):
                return t, True
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    t = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
    os.replace(tmp, path)
    return t, False


__all__ = ["KEYS", "cache_path", "load_or_compute", "pair_logprobs", "pairs_hash",
           "reference_logprobs", "weights_hash"]
