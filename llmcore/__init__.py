"""llmcore: hand-written CPU/CUDA kernels for BFP GEMM, fused attention and KV-cached
decoding, with a thin PyTorch layer on top: the ops (``llmcore.ops``), BFP linear layers
(``llmcore.nn``), a Llama-family model with a KV cache and Hugging Face checkpoints
(``llmcore.models``), and plain and assisted generation (``llmcore.generation``).
Documentation: docs/ in the repository."""

from llmcore import _ext, formats, ops
from llmcore.formats import PRESETS, BFPFormat, get_format
from llmcore.ops import BFPTensor

__version__ = "0.1.0"

__all__ = ["BFPFormat", "BFPTensor", "PRESETS", "formats", "get_format", "ops", "__version__"]


def extension_available() -> bool:
    """True when the compiled kernels (llmcore._C) are loaded."""
    return _ext.available()
