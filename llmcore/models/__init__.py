"""Models: the KV cache (and, as the project grows, the Llama-family transformer)."""

from llmcore.models.kv_cache import KVCache

__all__ = ["KVCache"]
