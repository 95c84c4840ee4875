"""Plain-PyTorch implementations of every llmcore op.

They are the oracles the kernel tests compare against, and the path taken on devices that
have no llmcore kernel (with a one-time warning). Written for clarity and exactness
(float64 where it matters), not speed.
"""

from llmcore.reference.bfp import (
    bfp_dequantize,
    bfp_gemm,
    bfp_linear,
    bfp_quantize,
    pack_nibbles,
    unpack_nibbles,
)

__all__ = [
    "bfp_dequantize",
    "bfp_gemm",
    "bfp_linear",
    "bfp_quantize",
    "pack_nibbles",
    "unpack_nibbles",
]
