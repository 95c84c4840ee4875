"""Mixtures: domain weights, read and checked, and a sampler that draws batches by them.

:class:`MixtureBatches` draws each sequence of a micro-batch from a domain picked with
probability equal to its weight, then a random window of ``seq_len + 1`` tokens of that
domain's train split. The draws come from a generator seeded by (seed, step, micro-batch
index), so a batch is a pure function of (step, index) and of the mixture: a run resumed
mid-way sees exactly the batches of an uninterrupted one. What the sampler depends on
(domains, weights, seed, shapes) is its :meth:`~MixtureBatches.state_dict`; the loop
saves it in every checkpoint and :meth:`~MixtureBatches.load_state_dict` refuses to
resume with another mixture.

A weights file is JSON: the ``domain_weights.json`` a DoReMi run writes
(``{"weights": {domain: w, ...}, ...}``) or a plain ``{domain: w, ...}`` object. Weights
are normalised to sum to 1; domains left out get weight 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from llmcore.data.domains import DomainShards


def _seed_of(*parts) -> int:
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def check_weights(weights: Mapping[str, float] | Sequence[float], names: Sequence[str],
                  arg: str = "weights") -> list[float]:
    """``weights`` (a {domain: w} mapping, or a sequence in the order of ``names``) as a
    list in the order of ``names``, normalised to sum to 1. ValueError naming ``arg`` for
    an unknown domain, a wrong length, a negative or non-finite weight, or all zeros."""
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"{arg}: unknown domain(s) {unknown}; the domains are "
                             f"{list(names)}")
        values = [weights.get(n, 0.0) for n in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise ValueError(f"{arg}: {len(values)} weights for {len(names)} domains "
                             f"{list(names)}")
    for n, v in zip(names, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"{arg}: the weight of domain {n!r} must be a finite number "
                             f">= 0, got {v!r}")
    total = float(sum(values))
    if total <= 0:
        raise ValueError(f"{arg}: the weights sum to 0; at least one domain needs weight > 0")
    return [float(v) / total for v in values]


def load_domain_weights(path: str | os.PathLike, arg: str = "domain_weights") -> dict[str, float]:
    """{domain: weight} from a JSON weights file (see the module docstring); the values are
    checked (finite, >= 0, not all zero) but not yet matched against any domains."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{arg}: {path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{arg}: {path} is not valid JSON ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("weights"), dict):
        obj = obj["weights"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{arg}: {path} must hold a JSON object {{domain: weight}} or "
                         "{\"weights\": {domain: weight}}")
    names = list(obj)
    return dict(zip(names, check_weights(obj, names, f"{arg} ({path})"), strict=True))


class MixtureBatches:
    """Micro-batches drawn by domain weights (see the module docstring):
    ``batch(step, index)`` -> {"input_ids", "labels"} [batch_size, seq_len] int64 and
    "domain" [batch_size] int64 (the index of each row's domain in ``domains.names``)."""

    def __init__(self, domains: DomainShards, weights: Mapping[str, float] | Sequence[float],
                 batch_size: int, seq_len: int, seed: int, arg: str = "domain_weights"):
        self.domains, self.names = domains, list(domains.names)
        self.weights = check_weights(weights, self.names, arg)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        for n, w in zip(self.names, self.weights, strict=True):
            have = domains.shards[n].num_tokens("train")
            if w > 0 and have < seq_len + 2:
                raise ValueError(f"{arg}: domain {n!r} has weight {w:.3g} but its train split "
                                 f"holds {have} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        self._probs = torch.tensor(self.weights, dtype=torch.float64)

    def domain_ids(self, step: int, index: int) -> torch.Tensor:
        """The domain index of each row of micro-batch (step, index): [batch_size] int64."""
        g = torch.Generator().manual_seed(_seed_of(self.seed, "mixture", step, index))
        return torch.multinomial(self._probs, self.batch_size, replacement=True, generator=g)

    def batch(self, step: int, index: int) -> dict:
        dom = self.domain_ids(step, index)
        g = torch.Generator().manual_seed(_seed_of(self.seed, "windows", step, index))
        rows = []
        for d in dom.tolist():
            tokens = self.domains.shards[self.names[d]].tokens("train")
            s = int(torch.randint(0, tokens.numel() - self.seq_len - 1, (1,), generator=g))
            rows.append(tokens[s:s + self.seq_len + 1].to(torch.int64))
        x = torch.stack(rows)
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
                "domain": dom}

    def state_dict(self) -> dict:
        return {"domains": self.names, "weights": self.weights, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = [k for k in mine if k != "weights" and state.get(k) != mine[k]]
        old_w = state.get("weights") or []
        if len(old_w) != len(self.weights) or any(abs(a - b) > 1e-12 for a, b in
                                                  zip(old_w, self.weights, strict=False)):
            diff.append("weights")
        if diff:
            raise ValueError(f"the checkpoint's mixture differs in {diff} "
                             f"(saved {state}, now {mine})")


__all__ = ["MixtureBatches", "check_weights", "load_domain_weights"]
