"""Models: configs and presets, the Llama-family transformer, the KV cache, Hugging Face
checkpoints and tokenizers."""

from llmcore.models.config import PRESETS, TransformerConfig
from llmcore.models.hf import HFTokenizer, load_tokenizer
from llmcore.models.kv_cache import KVCache
from llmcore.models.transformer import Transformer

__all__ = ["HFTokenizer", "KVCache", "PRESETS", "Transformer", "TransformerConfig",
           "load_tokenizer"]
