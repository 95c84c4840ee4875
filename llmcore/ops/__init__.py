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

__all__ = [
    "attention",
    "attention_varlen",
    "BFPTensor",
    "bfp_dequantize",
    "bfp_linear",
    "bfp_quantize",
    "decode_attention",
    "kv_cache_append",
    "load_bfp",
    "save_bfp",
]
