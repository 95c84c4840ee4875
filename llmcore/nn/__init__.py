"""nn modules built on llmcore ops."""

from llmcore.nn.bfp_linear import BFPLinear, quantize_model, replace_linear

__all__ = ["BFPLinear", "quantize_model", "replace_linear"]
