"""Fused decoder-step ops for inference: RMSNorm (with the residual add before it), RoPE of
q and k in place, SwiGLU's silu(gate) * up, and greedy decoding's argmax.

Each replaces a chain of small torch ops (a dispatch and a temporary each, which dominate a
small model's decode step on the CPU) by one kernel that rounds where the chain rounds; the
plain chains are in :mod:`llmcore.reference.fused`. Kernels are CPU only and take one dtype
for all their float inputs; any other call runs the reference chain. They have no autograd:
:class:`~llmcore.models.Transformer` takes them only when no gradient is recorded.
"""

from __future__ import annotations

import torch

from llmcore import _ext
from llmcore import reference as ref
from llmcore.ops._dispatch import kernel_supported


def _kernel(op: str, *tensors: torch.Tensor) -> bool:
    """True when ``op`` has a kernel for these tensors: one device and one dtype."""
    x = tensors[0]
    return (all(t.dtype == x.dtype and t.device == x.device for t in tensors[1:])
            and kernel_supported(op, x.device, x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: ``weight * (x * rsqrt(mean(x^2, -1) + eps))``.

    Parameters
    ----------
    x : Tensor [..., N]
        float32, bfloat16 or float16, any strides.
    weight : Tensor [N]
    eps : float

    Returns
    -------
    Tensor [..., N]: the normed x rounded to x's dtype, times weight (fp32 statistics).
    """
    if _kernel("rms_norm", x, weight):
        return torch.ops.llmcore.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMSNorm after it in one pass.

    Parameters
    ----------
    x, delta : Tensor [..., N]
        The residual stream and what is added to it.
    weight : Tensor [N]
    eps : float

    Returns
    -------
    (sum, normed): ``x + delta`` and :func:`rms_norm` of it, both [..., N].
    """
    if _kernel("add_rms_norm", x, delta, weight) and delta.shape == x.shape:
        return torch.ops.llmcore.add_rms_norm(x, delta, weight, eps)
    return ref.add_rms_norm(x, delta, weight, eps)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding of q and k in place (rotate-half form, as Llama):
    ``x * cos + rotate_half(x) * sin``.

    Parameters
    ----------
    q : Tensor [B, T, H, D], k : Tensor [B, T, Hk, D]
        Last dim contiguous, D even; overwritten.
    cos, sin : Tensor [B, T, D]
    """
    if _kernel("rope_", q, k, cos, sin) and q.stride(-1) == 1 and k.stride(-1) == 1:
        torch.ops.llmcore.rope_(q, k, cos, sin)
    else:
        ref.rope_(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` (silu rounded to the dtype before the product).

    Parameters
    ----------
    gate, up : Tensor [...], one shape

    Returns
    -------
    Tensor of gate's shape and dtype.
    """
    if _kernel("silu_mul", gate, up) and gate.shape == up.shape:
        return torch.ops.llmcore.silu_mul(gate, up)
    return ref.silu_mul(gate, up)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``: the index of the largest value along the last axis, the first one on
    ties and the first NaN if there is one. Greedy decoding's pick: on the CPU one pass
    over each row of logits (torch's reduction takes ~90 us for a 32000-token vocabulary).

    Parameters
    ----------
    x : Tensor [..., V], V >= 1

    Returns
    -------
    LongTensor [...] on x's device.
    """
    if (x.dim() >= 1 and x.shape[-1] >= 1 and not torch.compiler.is_compiling()
            and _kernel("argmax_last", x)):
        return torch.ops.llmcore.argmax_last(x)
    return x.argmax(-1)


if _ext.has_op("rms_norm"):

    @torch.library.register_fake("llmcore::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmcore::add_rms_norm")
    def _(x, delta, weight, eps):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    @torch.library.register_fake("llmcore::rope_")
    def _(q, k, cos, sin):
        return None

    @torch.library.register_fake("llmcore::silu_mul")
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    if _ext.has_op("argmax_last"):

        @torch.library.register_fake("llmcore::argmax_last")
        def _(x):
            return x.new_empty(x.shape[:-1], dtype=torch.long)

    @torch.library.register_fake("llmcore::decoder_layers")
    def _(x, cos, sin, weights, k_cache, v_cache, k_exponent, v_exponent, cache_seqlens,
          block_table, softmax_scale):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
