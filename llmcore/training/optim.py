"""AdamW with the usual parameter groups, and the learning-rate schedules.

Schedules are pure functions of the step, so a resumed run computes the same rate
without any scheduler state:

* ``cosine``: linear warmup to ``lr`` over ``warmup`` steps, then a cosine from ``lr`` to
  ``min_lr`` at the last step.
* ``wsd`` (warmup-stable-decay): warmup, a constant ``lr``, then a linear anneal to
  ``min_lr`` over the last ``decay_frac`` of the steps — the phase in which a run may
  switch to its best data (``decay_data``).
* ``constant``: warmup, then ``lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, *, steps: int, lr: float, min_lr: float, warmup: int,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(steps - 1 - warmup, 1)
        t = min((step - warmup) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        start = decay_start(steps, warmup, decay_frac)
        if step < start:
            return lr
        t = min((step - start + 1) / max(steps - start, 1), 1.0)
        return lr + (min_lr - lr) * t
    raise ValueError(f"unknown schedule {schedule!r}")


def decay_start(steps: int, warmup: int, decay_frac: float) -> int:
    """First step of the decay phase of a ``wsd`` schedule."""
    return max(warmup, steps - int(round(decay_frac * steps)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings); none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel where the device has one (CUDA),
    else the foreach implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = all(p.device.type == "cuda" for p in params)
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             **kw)
