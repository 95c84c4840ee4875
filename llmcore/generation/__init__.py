"""Text generation: sampling, ``generate`` and ``assisted_generate`` (DESIGN §3)."""

from llmcore.generation.assisted import (
    AssistedStats,
    PromptLookupDrafter,
    assisted_generate,
    layer_skip_draft,
    predicted_speedup,
    self_draft,
)
from llmcore.generation.generate import generate
from llmcore.generation.sampling import logits_to_probs, sample_next, top_k_mask, top_p_mask

__all__ = ["AssistedStats", "PromptLookupDrafter", "assisted_generate", "generate", "layer_skip_draft",
           "logits_to_probs", "predicted_speedup", "sample_next", "self_draft", "top_k_mask",
           "top_p_mask"]
