"""Drafts for ``assisted_generate`` named by a string, as a command line gives them.

  "prompt_lookup"               n-gram lookup in the prompt and the text so far (no model)
  "self-mxint8", "self-mxint4"  the target itself with BFP weights (``self_draft``)
  any other string              a Hugging Face checkpoint directory sharing the target's
                                tokenizer, loaded with the target's dtype, device, backend
"""

from __future__ import annotations

PROMPT_LOOKUP = "prompt_lookup"
# self-draft name -> BFP weight format
SELF_DRAFTS = {"self-mxint8": "mxint8", "self-mxint4": "mxint4"}
# A self-draft's own KV cache: its attention matches the target's closely, so an MXINT8
# cache (half the bytes of 16-bit) costs it little acceptance.
SELF_DRAFT_CACHE = "mxint8"


def named_draft(name: str, target, cache_storage: str = "native") -> tuple[object, str]:
    """The draft called ``name`` for ``target`` and the KV cache storage it should use
    (``draft_cache_storage`` of ``assisted_generate``; ``cache_storage`` is the target's).

    Raises ``ValueError`` for an unknown ``self-`` name or a self-draft of a quantised
    target, ``FileNotFoundError`` for a directory that does not exist.
    """
    if name == PROMPT_LOOKUP:
        return PROMPT_LOOKUP, cache_storage
    if name.startswith("self-"):
        if name not in SELF_DRAFTS:
            raise ValueError(f"unknown self-draft {name!r}; self-drafts are "
                             f"{', '.join(SELF_DRAFTS)}")
        from llmcore.generation.assisted import self_draft

        return self_draft(target, SELF_DRAFTS[name]), SELF_DRAFT_CACHE
    from llmcore.models import Transformer

    draft = Transformer.from_pretrained(name, dtype=target.dtype, device=target.device,
                                        backend=target.backend)
    return draft.eval(), cache_storage
