"""Loading of the compiled extension, and the fallback to the reference ops.

``llmcore._C`` registers the ``torch.ops.llmcore.*`` schemas and the CPU (and, in a CUDA
build, CUDA) kernels. A device with no kernel (or an import without the compiled
extension) takes the plain-PyTorch path in :mod:`llmcore.reference`, with a one-time
warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

try:
    from llmcore import _C  # noqa: F401  (registers torch.ops.llmcore.*)

    LOAD_ERROR: Exception | None = None
except ImportError as e:  # not built: the reference path still works
    _C = None
    LOAD_ERROR = e

_warned: set[str] = set()

# Every schema in csrc/ops.cpp, in its order.
OPS = ("bfp_quantize", "bfp_dequantize", "bfp_linear", "bfp_gemm", "bfp_act_linear",
       "bfp_act_linear_multi", "bfp_tiles_pack", "bfp_tiles_unpack", "bfp_embedding",
       "linear_gemv", "attention_fwd", "attention_bwd", "attention_varlen_fwd",
       "attention_varlen_bwd", "rms_norm", "add_rms_norm", "rope_", "silu_mul", "argmax_last",
       "decode_attention", "kv_cache_append", "decoder_layers", "greedy_decode")


def available() -> bool:
    """True when the compiled extension is loaded."""
    return _C is not None


def has_op(op: str) -> bool:
    """True when the loaded extension defines the schema ``llmcore::<op>`` (a stale build
    may predate newer ops: their Python faces then take the reference path)."""
    return _C is not None and hasattr(torch.ops.llmcore, op)


def has_kernel(op: str, device: torch.device) -> bool:
    """True when ``torch.ops.llmcore.<op>`` has a kernel for ``device``'s type."""
    return _has_kernel(op, device.type)


@torch.compiler.assume_constant_result  # a constant of the build: traced as such
def _has_kernel(op: str, device_type: str) -> bool:
    return _has_kernel_cached(op, device_type)


@functools.cache  # asked on every op call; the answer never changes once loaded
def _has_kernel_cached(op: str, device_type: str) -> bool:
    if not has_op(op):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"llmcore::{op}", key)


def warn_fallback(op: str, device: torch.device, why: str | None = None) -> None:
    """Warn once per (op, device type) that the slow reference path is taken (``why``:
    the reason, when the kernel exists but not for these inputs)."""
    tag = f"{op}/{device.type}"
    if tag in _warned:
        return
    _warned.add(tag)
    if _C is None:
        why = f"the extension failed to load ({LOAD_ERROR})"
    elif why is None:
        why = f"no llmcore kernel for device type {device.type!r}"
    warnings.warn(f"llmcore.{op}: {why}; using the plain-PyTorch reference (slow)",
                  RuntimeWarning, stacklevel=3)
