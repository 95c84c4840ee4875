"""Kernel or reference: the one decision every op's Python face makes the same way.

A call takes the compiled kernel ``torch.ops.llmcore.<op>`` when the capability table
(:mod:`llmcore.ops.capabilities`) lists one for its device type, dtype and head_dim and
the loaded extension registers it for that device; otherwise it takes the plain-PyTorch
reference in :mod:`llmcore.reference`, with a one-time warning per (op, device type).
"""

from __future__ import annotations

import torch

from llmcore import _ext
from llmcore import reference as ref
from llmcore.ops import capabilities

# torch dtype -> the table's spelling (a dict lookup, which torch.compile traces as a
# constant; any other dtype has no kernel)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def kernel_supported(op: str, device: torch.device, dtype: torch.dtype | None = None,
                     head_dim: int | None = None) -> bool:
    """True when ``op`` has a kernel for this device, dtype and head_dim (None: any)."""
    dt = None if dtype is None else _DTYPE_NAMES.get(dtype, "other")
    return (capabilities.supports(op, device.type, dt, head_dim)
            and _ext.has_kernel(op, device))


def use_kernel(op: str, device: torch.device, dtype: torch.dtype | None = None,
               head_dim: int | None = None, name: str | None = None) -> bool:
    """:func:`kernel_supported`, warning once (as ``llmcore.<name>``, default ``op``) when
    the answer is no and the reference is about to run."""
    if kernel_supported(op, device, dtype, head_dim):
        return True
    why = None
    if _ext.has_kernel(op, device):  # a kernel, but not for these inputs
        why = (f"the {device.type} kernel does not take dtype {dtype}"
               + ("" if head_dim is None else f" with head_dim {head_dim}"))
    _ext.warn_fallback(name or op, device, why)
    return False


def kernel_or_reference(op: str, device: torch.device, dtype: torch.dtype | None = None,
                        head_dim: int | None = None, name: str | None = None):
    """``torch.ops.llmcore.<op>``, or ``llmcore.reference.<op>`` (same signature) with the
    one-time warning."""
    if use_kernel(op, device, dtype, head_dim, name):
        return getattr(torch.ops.llmcore, op)
    return getattr(ref, op)
