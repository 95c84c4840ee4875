"""Dense linear for decoding: ``x @ weight^T (+ bias)`` for a few rows, with the weight
streamed once at memory bandwidth.

At one row (a decode step) a linear reads each weight once and does one multiply-add per
element read: it is bound by memory, and torch's ``F.linear`` reaches about half the
bandwidth for bf16 weights on the CPU. ``linear_gemv`` takes up to 16 rows (decoding a
batch, verifying a draft) and reads each weight row once for all of them; more rows are a
GEMM, for ``F.linear``. CPU kernel only (AVX-512 with AVX512_BF16, AVX2 and scalar paths),
no autograd; :class:`~llmcore.models.Transformer` calls it in its inference paths.
"""

from __future__ import annotations

import math

import torch

from llmcore import _ext
from llmcore.ops._dispatch import kernel_or_reference, kernel_supported

MAX_ROWS = 16  # more rows: a GEMM (F.linear)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim ([..., K]), got a 0-dim tensor")
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS:
        raise ValueError(f"x must have at most {MAX_ROWS} rows (the product of its leading "
                         f"dims) for linear_gemv, got shape {list(x.shape)} ({rows} rows); "
                         "use F.linear for more")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] (K = x.shape[-1]), got shape "
                         f"{list(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        if bias.dtype != x.dtype:
            raise ValueError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (weight.shape[0]), got "
                             f"{list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``y = x @ weight^T (+ bias)`` for at most 16 rows, the weight read once.

    Parameters
    ----------
    x : Tensor [..., K]
        float32, bfloat16 or float16, any strides; at most 16 rows (the product of the
        leading dims: use ``F.linear`` for more).
    weight : Tensor [N, K]
        x's dtype and device; on the CPU contiguous in its last dim, any row stride (a
        slice of rows of a larger matrix is read in place).
    bias : Tensor [N], optional
        x's dtype.

    Returns
    -------
    Tensor [..., N] of x's dtype: the sums in fp32 (the CPU's AVX512_BF16 path multiplies
    bf16 pairs exactly, reading subnormal inputs as zero), the bias added in fp32, rounded
    once. The same bits on any number of threads. Devices without a kernel run the float64
    reference (:func:`llmcore.reference.linear_gemv`).
    """
    _check(x, weight, bias)
    fn = kernel_or_reference("linear_gemv", x.device, x.dtype)
    return fn(x, weight, bias)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear_gemv`'s kernel takes this product as the model's inference
    paths call it (csrc/fused/decoder_layers_binding.cpp decides the same way): CPU, at most 16
    rows, one float dtype, a weight contiguous in its last dim and no autocast."""
    return (x.device.type == "cpu" and x.dim() >= 1 and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and weight.dim() == 2
            and (weight.stride(1) == 1 or weight.shape[1] <= 1)
            and math.prod(x.shape[:-1]) <= MAX_ROWS
            and not torch.is_autocast_enabled("cpu")
            and kernel_supported("linear_gemv", x.device, x.dtype))


if _ext.has_op("linear_gemv"):

    @torch.library.register_fake("llmcore::linear_gemv")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
