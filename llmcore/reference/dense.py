"""Reference dense linear: the oracle of ``llmcore::linear_gemv``."""

from __future__ import annotations

import torch


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias[N]) in float64, returned in x's dtype (one
    rounding; any number of rows)."""
    y = x.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
