"""Text generation: sampling, ``generate``, ``assisted_generate`` and its drafters,
best-of-N reranking and self-correction."""

from llmcore.generation.assisted import AssistedStats, assisted_generate, predicted_speedup
from llmcore.generation.drafters import (
    Drafter,
    ModelDrafter,
    PromptLookupDrafter,
    layer_skip_draft,
    self_draft,
)
from llmcore.generation.generate import generate, pad_token
from llmcore.generation.rerank import best_of_n, self_correct
from llmcore.generation.sampling import logits_to_probs, sample_next, top_k_mask, top_p_mask

__all__ = ["AssistedStats", "Drafter", "ModelDrafter", "PromptLookupDrafter",
           "assisted_generate", "best_of_n", "generate", "layer_skip_draft", "logits_to_probs", "pad_token",
           "predicted_speedup", "sample_next", "self_correct", "self_draft", "top_k_mask", "top_p_mask"]
