"""Models: configs and presets, the Llama-family transformer, the KV cache, Hugging Face
checkpoint conversion (tokenizers: :mod:`llmcore.tokenizer`)."""

from llmcore.models.config import PRESETS, TransformerConfig
from llmcore.models.kv_cache import KVCache
from llmcore.models.reward import RewardModel
from llmcore.models.transformer import Transformer

__all__ = ["KVCache", "PRESETS", "RewardModel", "Transformer", "TransformerConfig"]
