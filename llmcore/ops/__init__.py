"""llmcore ops: the Python face of the compiled kernels (``torch.ops.llmcore.*``)."""

from llmcore.ops.attention import attention, attention_varlen
from llmcore.ops.bfp import (
    BFPTensor,
    bfp_dequantize,
    bfp_linear,
    bfp_quantize,
    load_bfp,
    save_bfp,
)
from llmcore.ops.decode import decode_attention, kv_cache_append
from llmcore.ops.dense import linear_gemv

__all__ = [
    "attention",
    "attention_varlen",
    "BFPTensor",
    "bfp_dequantize",
    "bfp_linear",
    "bfp_quantize",
    "decode_attention",
    "kv_cache_append",
    "linear_gemv",
    "load_bfp",
    "save_bfp",
]
