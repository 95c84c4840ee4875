"""Drafters for :func:`~llmcore.generation.assisted_generate`: the :class:`Drafter`
protocol, a draft model (:class:`ModelDrafter`), prompt lookup
(:class:`PromptLookupDrafter`), and draft models made from the target itself
(:func:`self_draft`, :func:`layer_skip_draft`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from llmcore.generation.sampling import logits_to_probs
from llmcore.ops.fused import argmax

MAX_DRAFT_TOKENS = 15  # the target scores at most 16 tokens per call (decode_attention)
Sampling = tuple[float, int | None, float | None]  # temperature, top_k, top_p


@runtime_checkable
class Drafter(Protocol):
    """What ``assisted_generate`` asks of a drafter. Sequences are lists of token ids
    (every committed token of each row); a drafter keeps whatever state it needs (a KV
    cache) in step with them.

    calls      draft-model forward passes so far (stays 0 without a model)
    prefill    take in the prompts, before the first proposal
    propose    up to ``ks[b]`` tokens for row b: (tokens [B, K] int64, the draft
               distributions q [B, K, V] float32 they were drawn from, or None when the
               proposals are deterministic (q one-hot), the number of proposals made per
               row: at most ``ks[b]``, possibly fewer)
    commit     after verification: ``new_lengths[b]`` is row b's committed length
    """

    calls: int

    def prefill(self, seqs: list[list[int]]) -> None: ...

    def propose(self, seqs: list[list[int]], ks: list[int], sampling: Sampling,
                generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]: ...

    def commit(self, new_lengths: list[int]) -> None: ...


# ---------------------------------------------------------------------------------------
# Feeding tokens to a model whose sequences grow by different amounts
# ---------------------------------------------------------------------------------------
def feed(model, cache, seqs: Sequence[Sequence[int]], device, prefill: bool = False,
         logits: bool = True) -> torch.Tensor | None:
    """Append each row's tokens ``seqs[b]`` (any lengths, possibly none) to ``cache`` in one
    forward pass and return the logits [B, T, V] (T = the longest row; entries past a row's
    length are meaningless). Rows are right-padded with filler, which sits after every real
    token (so the causal mask hides it from them) and is rolled back afterwards.
    ``prefill``: the cache is empty (see ``Transformer.forward``). ``logits=False``: only
    fill the cache (the output head runs for one position) and return None."""
    width = max(len(s) for s in seqs)
    if width == 0:
        return None
    before = cache.lengths
    packed = torch.zeros(len(seqs), width, dtype=torch.int64)
    for b, s in enumerate(seqs):
        if s:
            packed[b, :len(s)] = torch.tensor(s, dtype=torch.int64)
            packed[b, len(s):] = s[-1]
    out = model(packed.to(device), cache=cache, prefill=prefill,
                logits_to_keep=0 if logits else 1)
    if any(len(s) != width for s in seqs):
        cache.rollback([n + len(s) for n, s in zip(before, seqs, strict=True)])
    return out if logits else None


# ---------------------------------------------------------------------------------------
# Drafters: propose up to k_b tokens per row, with their draft distributions
# ---------------------------------------------------------------------------------------
class ModelDrafter:
    """Proposals from a smaller (or quantised) model with its own KV cache, sampled with
    the same temperature / top-k / top-p as the target (argmax at temperature 0)."""

    def __init__(self, draft_model, batch: int, max_len: int, cache_storage: str,
                 vocab: int):
        dcfg = draft_model.config
        if dcfg.vocab_size < vocab // 2 or dcfg.vocab_size > 2 * vocab:
            raise ValueError(f"draft_model's vocab_size ({dcfg.vocab_size}) does not look like "
                             f"the target's ({vocab}): the two models must share a tokenizer")
        if dcfg.max_seq_len < max_len - MAX_DRAFT_TOKENS - 2:
            raise ValueError(f"draft_model's max_seq_len ({dcfg.max_seq_len}) is shorter than "
                             f"the prompt + max_new_tokens")
        self.model, self.vocab = draft_model, vocab
        self.device = draft_model.device
        self.cache = draft_model.new_cache(batch, max_len, storage=cache_storage)
        self.calls = 0

    def prefill(self, seqs: list[list[int]]) -> None:
        """Take in every committed token but the last of each row."""
        feed(self.model, self.cache, [s[:-1] for s in seqs], self.device, prefill=True,
             logits=False)

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the target's vocabulary (cut, or padded with -inf)."""
        logits = logits.float()
        v = logits.shape[-1]
        if v >= self.vocab:
            return logits[:, :self.vocab]
        pad = logits.new_full((logits.shape[0], self.vocab - v), float("-inf"))
        return torch.cat([logits, pad], dim=1)

    def propose(self, seqs, ks, sampling, generator):
        """seqs: each row's committed tokens; ks: proposals wanted per row.
        Returns (tokens [B, K] int64, q [B, K, V] float32 or None at temperature 0, ks)."""
        B, K = len(seqs), max(ks)
        greedy = sampling[0] == 0
        # catch up: each row feeds what its cache lacks (1 token, or 2 after a bonus token)
        have = self.cache.lengths
        tails = [s[n:] if k > 0 else [] for s, n, k in zip(seqs, have, ks, strict=True)]
        loop = getattr(self.model, "decode_greedy", None)
        if (greedy and loop is not None and all(k == K for k in ks) and all(tails)
                and self.model.config.vocab_size == self.vocab):
            # Greedy proposals from one call of the draft's own greedy loop (on the CPU one
            # op for all K steps), its first step over each row's tail (the last token, or a
            # bonus token's predecessor and the bonus token; when the rows' tails differ in
            # length, all but their last tokens go in by a forward first): the same tokens
            # and cache as the loop below (argmax over the whole vocabulary is argmax over
            # the fitted logits when the vocabularies match), without Python, a logits
            # tensor and a host sync per drafted token, nor a forward of its own for the
            # bonus token's predecessor.
            if len({len(t) for t in tails}) > 1:
                feed(self.model, self.cache, [t[:-1] for t in tails], self.device, logits=False)
                self.calls += 1
                tails = [t[-1:] for t in tails]
            prefix = torch.tensor(tails, dtype=torch.int64, device=self.device)
            self.calls += K
            return loop(prefix, self.cache, K), None, list(ks)
        toks = torch.zeros(B, K, dtype=torch.int64, device=self.device)
        qs = None if greedy else torch.zeros(B, K, self.vocab, device=self.device)
        logits = feed(self.model, self.cache, tails, self.device)
        self.calls += 1
        last = torch.tensor([max(len(t) - 1, 0) for t in tails], device=self.device)
        rows = torch.arange(B, device=self.device)
        step_logits = logits[rows, last]
        for j in range(K):
            fitted = self._fit_vocab(step_logits)
            if greedy:
                tok = argmax(fitted)
            else:
                q = logits_to_probs(fitted, *sampling)
                qs[:, j] = q
                tok = torch.multinomial(q, 1, generator=generator).squeeze(-1)
            toks[:, j] = tok
            if j + 1 < K:  # feed the proposal to get the next one (rows done with 0s)
                nxt = [[int(tok[b])] if j + 1 < ks[b] else [] for b in range(B)]
                out = feed(self.model, self.cache, nxt, self.device)
                self.calls += 1
                step_logits = out[:, 0]
        return toks, qs, list(ks)

    def commit(self, new_lengths: list[int]) -> None:
        """After verification: keep what the target kept (each row's committed length minus
        one: the last token is fed at the next proposal)."""
        have = self.cache.lengths
        self.cache.rollback([min(h, n - 1) for h, n in zip(have, new_lengths, strict=True)])


class PromptLookupDrafter:
    """Proposals copied from earlier in the sequence (prompt lookup decoding, Saxena 2023):
    find the most recent earlier occurrence of the last n tokens (n from ``max_ngram``
    down to ``min_ngram``) and propose the tokens that followed it. No model, no cache."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(max_ngram, int) and isinstance(min_ngram, int)
                and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, "
                             f"max_ngram={max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.calls = 0  # no model: never any draft calls

    def lookup(self, seq: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier match of seq's suffix."""
        n_tok = len(seq)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            pattern = list(seq[n_tok - n:])
            for start in range(n_tok - n - 1, -1, -1):  # latest match first
                if list(seq[start:start + n]) == pattern:
                    follow = list(seq[start + n:start + n + k])
                    if follow:
                        return follow
        return []

    def prefill(self, seqs) -> None:
        pass

    def propose(self, seqs, ks, sampling, generator):
        """Returns (tokens [B, K], None: the proposals are deterministic (q one-hot), the
        number found per row: fewer than asked, or none, where nothing matched)."""
        found = [self.lookup(s, k) for s, k in zip(seqs, ks, strict=True)]
        K = max(len(f) for f in found)
        toks = torch.zeros(len(seqs), K, dtype=torch.int64)
        for b, f in enumerate(found):
            toks[b, :len(f)] = torch.tensor(f, dtype=torch.int64)
        return toks, None, [len(f) for f in found]

    def commit(self, new_lengths) -> None:
        pass


def self_draft(model, format: str = "mxint4", lm_head: str | None = "auto"):
    """A draft model that is ``model`` with BFP weights (``model.quantized(format,
    lm_head=lm_head)``): no second model to train or download. The embedding table is
    shared with the target, not copied."""
    return model.quantized(format, lm_head=lm_head).eval()


def layer_skip_draft(model, n_layers: int, format: str | None = None):
    """A draft made of the target's first ``n_layers`` blocks, its final norm and its
    output head (early exit, as in LayerSkip and Draft & Verify): no second model to train.
    Without ``format`` every module is shared with the target (no memory); with a BFP
    ``format`` the kept blocks and the head are copied and quantised (``quantized(format)``),
    the embedding table is still shared."""
    draft = model.truncated(n_layers)
    return (draft if format is None else draft.quantized(format)).eval()


# ---------------------------------------------------------------------------------------
# Drafts named by a string, as a command line gives them: "prompt_lookup" (n-gram lookup,
# no model), "self-mxint8" / "self-mxint4" (the target with BFP weights), or a Hugging
# Face checkpoint directory sharing the target's tokenizer.
# ---------------------------------------------------------------------------------------
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
        return self_draft(target, SELF_DRAFTS[name]), SELF_DRAFT_CACHE
    from llmcore.models import Transformer

    draft = Transformer.from_pretrained(name, dtype=target.dtype, device=target.device,
                                        backend=target.backend)
    return draft.eval(), cache_storage
