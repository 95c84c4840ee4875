"""llmcore ops: the Python face of the compiled kernels (``torch.ops.llmcore.*``)."""

from llmcore.ops.bfp import (
    BFPTensor,
    bfp_dequantize,
    bfp_linear,
    bfp_quantize,
    load_bfp,
    save_bfp,
)

__all__ = [
    "BFPTensor",
    "bfp_dequantize",
    "bfp_linear",
    "bfp_quantize",
    "load_bfp",
    "save_bfp",
]
