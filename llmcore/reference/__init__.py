"""Plain-PyTorch implementations of every llmcore op.

They are the oracles the kernel tests compare against, and the path taken on devices that
have no llmcore kernel (with a one-time warning). Written for clarity and exactness
(float64 where it matters), not speed.
"""

from llmcore.reference.attention import (
    attention_bwd,
    attention_fwd,
    attention_varlen_bwd,
    attention_varlen_fwd,
)
from llmcore.reference.bfp import (
    bfp_dequantize,
    bfp_gemm,
    bfp_linear,
    bfp_quantize,
    pack_nibbles,
    unpack_nibbles,
)
from llmcore.reference.decode import decode_attention, kv_cache_append
from llmcore.reference.dense import linear_gemv
from llmcore.reference.fused import add_rms_norm, rms_norm, rope_, silu_mul

__all__ = [
    "add_rms_norm",
    "rms_norm",
    "rope_",
    "silu_mul",
    "attention_bwd",
    "attention_fwd",
    "attention_varlen_bwd",
    "attention_varlen_fwd",
    "bfp_dequantize",
    "decode_attention",
    "kv_cache_append",
    "linear_gemv",
    "bfp_gemm",
    "bfp_linear",
    "bfp_quantize",
    "pack_nibbles",
    "unpack_nibbles",
]
