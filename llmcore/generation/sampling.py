"""Sampling: pure functions from next-token logits to a filtered distribution or a token.

``logits_to_probs(logits, temperature, top_k, top_p)`` -> probabilities [B, V] after
temperature scaling and top-k / nucleus (top-p) filtering (temperature 0: one-hot at the
argmax); ``sample_next(...)`` -> LongTensor [B] drawn from it (argmax at temperature 0).
Assisted generation reuses ``logits_to_probs`` for its p and q distributions.
"""

from __future__ import annotations

import torch

from llmcore.ops.fused import argmax


def _check(logits: torch.Tensor, temperature, top_k, top_p) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a tensor [batch, vocab], got "
                         f"{getattr(logits, 'shape', type(logits))}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one vocabulary entry")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool [B, V]: True where a logit is among the ``top_k`` largest of its row (ties at
    the k-th value are kept)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits >= kth


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [B, V]: the smallest set of most probable tokens whose cumulative probability
    is >= ``top_p`` (always at least one token)."""
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    # keep a token when the mass before it is still < top_p (the first is always kept)
    keep_sorted = (cum - sorted_p) < top_p
    keep_sorted[:, 0] = True
    mask = torch.zeros_like(keep_sorted)
    return mask.scatter(-1, idx, keep_sorted)


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution [B, V] (float32): softmax(logits / temperature) restricted
    to the top-k tokens, then to the nucleus of mass ``top_p``, renormalised. Temperature 0
    gives a one-hot at each row's argmax."""
    _check(logits, temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, argmax(logits).unsqueeze(-1), 1.0)
    logits = logits / temperature
    if top_k is not None:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = probs * top_p_mask(probs, top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Next token of each row: LongTensor [B]. Temperature 0 is argmax (top_k/top_p do not
    change it); otherwise a draw from :func:`logits_to_probs` with ``generator``."""
    _check(logits, temperature, top_k, top_p)
    if temperature == 0:
        return argmax(logits)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
