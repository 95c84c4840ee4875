"""Reference BFP quantisation and matrix products (docs/formats.md, docs/bfp.md), bit-exact.

Tensors use the storage layout of the ops: ``mantissa`` int8 [..., K] (formats of <= 4
bits: uint8 [..., ceil(K/2)], element 2i in the low nibble), ``exponent`` uint8
[..., ceil(K/B)] biased by 127, 255 for a block that held Inf/NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAN_EXPONENT = 255


def pack_nibbles(m: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] with values in [-8, 7] -> uint8 [..., ceil(K/2)] (low nibble first)."""
    k = m.shape[-1]
    if k % 2:
        m = F.pad(m, (0, 1))
    u = (m.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/2)] -> int8 [..., k], sign-extending each nibble."""
    lo = (p.to(torch.int16) & 0xF)
    hi = (p.to(torch.int16) >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :k]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """[..., K] -> [..., nb, B] zero-padded along the last axis."""
    k = x.shape[-1]
    nb = -(-k // block_size)
    x = F.pad(x, (0, nb * block_size - k))
    return x.reshape(*x.shape[:-1], nb, block_size), k


def bfp_quantize(x: torch.Tensor, mantissa_bits: int, block_size: int,
                 round_even: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [..., K] -> (mantissa, exponent) in storage layout."""
    xb, k = _blocks(x.to(torch.float64), block_size)
    finite = torch.isfinite(xb).all(dim=-1)  # [..., nb]
    amax = torch.where(torch.isfinite(xb), xb.abs(), 0.0).amax(dim=-1)
    _, ex = torch.frexp(amax)  # amax = frac * 2^ex, frac in [0.5, 1)
    e = torch.where(amax > 0, ex.to(torch.int64) - 1, -127).clamp(-127, 127)
    v = xb * torch.exp2((mantissa_bits - 2 - e).to(torch.float64)).unsqueeze(-1)
    if round_even:
        r = torch.round(v)
    else:
        r = torch.sign(v) * torch.floor(v.abs() + 0.5)
    lim = (1 << (mantissa_bits - 1)) - 1
    m = r.clamp(-lim, lim)
    m = torch.where(finite.unsqueeze(-1), m, 0.0)
    m = m.reshape(*m.shape[:-2], m.shape[-2] * block_size)[..., :k].to(torch.int8)
    exp = torch.where(finite, e + 127, NAN_EXPONENT).to(torch.uint8)
    if mantissa_bits <= 4:
        m = pack_nibbles(m)
    return m, exp


def bfp_dequantize(mantissa: torch.Tensor, exponent: torch.Tensor, mantissa_bits: int,
                   block_size: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(mantissa, exponent) -> values [..., k] of ``dtype`` (computed exactly in float64)."""
    m = unpack_nibbles(mantissa, k) if mantissa_bits <= 4 else mantissa
    nb = exponent.shape[-1]
    m = F.pad(m.to(torch.float64), (0, nb * block_size - k))
    m = m.reshape(*m.shape[:-1], nb, block_size)
    e = exponent.to(torch.int64)
    scale = torch.exp2((e - 127 - (mantissa_bits - 2)).to(torch.float64))
    scale = torch.where(e == NAN_EXPONENT, float("nan"), scale)
    out = (m * scale.unsqueeze(-1)).reshape(*m.shape[:-2], nb * block_size)[..., :k]
    return out.to(dtype)


def bfp_linear(x: torch.Tensor, w_mantissa: torch.Tensor, w_exponent: torch.Tensor,
               mantissa_bits: int, block_size: int, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Weight-only BFP linear: x [..., K] @ dequant(w)[N, K]^T (+ bias), in float64,
    returned in x's dtype."""
    k = x.shape[-1]
    w = bfp_dequantize(w_mantissa, w_exponent, mantissa_bits, block_size, k, torch.float64)
    y = x.to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def bfp_gemm(a_mantissa: torch.Tensor, a_exponent: torch.Tensor, b_mantissa: torch.Tensor,
             b_exponent: torch.Tensor, a_bits: int, b_bits: int, block_size: int, k: int,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """Product of two BFP operands: dequant(a)[M, K] @ dequant(b)[N, K]^T (+ bias), the
    float64 product of the dequantised operands, returned as ``out_dtype``."""
    a = bfp_dequantize(a_mantissa, a_exponent, a_bits, block_size, k, torch.float64)
    b = bfp_dequantize(b_mantissa, b_exponent, b_bits, block_size, k, torch.float64)
    y = a @ b.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)
