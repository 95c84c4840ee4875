"""Text generation: sampling and ``generate`` (DESIGN §3)."""

from llmcore.generation.generate import generate
from llmcore.generation.sampling import logits_to_probs, sample_next, top_k_mask, top_p_mask

__all__ = ["generate", "logits_to_probs", "sample_next", "top_k_mask", "top_p_mask"]
