"""Losses as pure functions of tensors, each with its formula, so they can be checked
alone against values computed from the definition.

Language modelling:

* ``cross_entropy(logits, labels, ignore_index=-100)`` — mean over counted tokens of
  −log softmax(logits)[label]; with ``reduction="sum"`` the sum (what perplexity and bits
  per byte accumulate over many batches).
* ``perplexity(nll_sum, tokens)`` = exp(nll_sum / tokens).
* ``bits_per_byte(nll_sum, n_bytes)`` = nll_sum / n_bytes / ln 2 — comparable across
  tokenizers and with compressors, since it counts the bytes of the text, not tokens.
* ``sequence_logprobs(logits, labels, mask, average=False)`` — Σ_t mask_t · log p(label_t)
  per sequence (÷ Σ mask with ``average=True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy. logits [..., V] (any float dtype; computed in fp32),
    labels [...] int64 with ``ignore_index`` for positions that do not count.

    mean: Σ −log p(y_t) / #counted (0 when nothing counts, not NaN); sum: Σ −log p(y_t).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} must "
                         "agree on all but the last (vocab) dim")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return flat
    count = (labels != ignore_index).sum().clamp(min=1)
    return flat / count


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean token NLL)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be > 0, got {tokens}")
    return math.exp(nll_sum / tokens)


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Summed token NLL (nats) / UTF-8 bytes / ln 2."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return nll_sum / n_bytes / math.log(2)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Σ_t mask[b, t] · log softmax(logits[b, t])[labels[b, t]] per row b -> [B] fp32.

    logits [B, T, V] are aligned with labels [B, T] (shift before calling); mask [B, T]
    is 1 on completion tokens, 0 on prompt and padding. ``average=True`` divides by the
    number of counted tokens of each row (a row with none gives 0).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(f"need logits [B, T, V], labels and mask [B, T]; got "
                         f"{list(logits.shape)}, {list(labels.shape)}, {list(mask.shape)}")
    m = mask.to(torch.float32)
    safe = torch.where(mask.bool(), labels, torch.zeros_like(labels))
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    total = torch.where(mask.bool(), lp, torch.zeros_like(lp)).sum(-1)
    if average:
        return total / m.sum(-1).clamp(min=1)
    return total
