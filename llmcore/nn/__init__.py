"""nn modules built on llmcore ops."""

from llmcore.nn.bfp_embedding import BFPEmbedding
from llmcore.nn.bfp_linear import BFPLinear, quantize_model, replace_linear

__all__ = ["BFPEmbedding", "BFPLinear", "quantize_model", "replace_linear"]
