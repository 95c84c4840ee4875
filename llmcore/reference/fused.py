"""Reference fused decoder-step ops: the unfused PyTorch chains the model runs, one op at a
time (so they round where the model rounds). The kernels in csrc/fused match these up to
fp32 summation order and the libm exp."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), the normed x computed in fp32 and rounded to
    x's dtype before the weight multiplies it (Llama's RMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta))."""
    s = x + delta
    return s, rms_norm(s, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] * cos + rotate_half(x) * sin, cos/sin [B, T, 1, D] (or broadcastable)."""
    return x * cos + rotate_half(x) * sin


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """:func:`rope` of q and k [B, T, heads, D] with cos/sin [B, T, D], written in place."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    q.copy_(rope(q, c, s))
    k.copy_(rope(k, c, s))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (SwiGLU)."""
    return F.silu(gate) * up
