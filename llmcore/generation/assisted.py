"""``assisted_generate``: speculative decoding with a draft model, prompt lookup or a
quantised copy of the target itself (docs/generation.md).

Each step, a drafter proposes up to γ tokens per sequence; the target scores the last
committed token and all γ proposals in one forward pass over its KV cache
(``decode_attention`` with q_len = γ + 1), keeps the longest prefix it agrees with and
adds one token of its own (the correction at the first rejection, or a bonus token when
every proposal was kept). Decoding is bandwidth-bound, so scoring γ + 1 tokens costs about
as much as generating one.

Acceptance:
  greedy (temperature 0)  a proposal is kept when it is the target's argmax, and the added
                          token is the target's argmax, so the output is token for token
                          the target's own greedy ``generate``.
  sampling                exact speculative sampling (Leviathan et al. 2023; Chen et al.
                          2023): keep d ~ q with probability min(1, p(d) / q(d)); at the
                          first rejection draw from norm(max(0, p − q)); after a full
                          acceptance draw the bonus token from p. The output distribution
                          is the target's (p and q are the filtered distributions of
                          ``logits_to_probs`` with the same temperature / top-k / top-p).
                          Prompt lookup proposes deterministically (q one-hot).

Cache invariant: both caches hold every committed token of a sequence except the last,
which is fed at the start of the next step; rejected positions are rolled back, and the
draft's cache takes in the last proposal and the target's bonus token at the start of its
next drafting call. Sequences in a batch accept independently (each has its own length).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmcore.generation.drafters import (
    MAX_DRAFT_TOKENS,
    Drafter,
    ModelDrafter,
    PromptLookupDrafter,
    feed,
)
from llmcore.generation.generate import check_generation_inputs, finish_batch, pad_token
from llmcore.generation.sampling import logits_to_probs
from llmcore.ops.fused import argmax

SCHEDULES = ("heuristic", "constant")


@dataclass
class AssistedStats:
    """What an ``assisted_generate`` call did. The counts add up:
    ``new_tokens == accepted + target_tokens``, ``sum(accepted_hist) == row_steps`` and
    ``sum(n * c for n, c in enumerate(accepted_hist)) == accepted``.

    drafted        proposals made (summed over sequences)
    accepted       proposals kept (and emitted)
    rejected       row-steps that ended at a rejected proposal
    target_tokens  tokens drawn from the target (corrections and bonus tokens)
    new_tokens     tokens emitted, EOS included, padding excluded
    row_steps      (sequence, target call) pairs in which the sequence was still running
    target_calls   target forward passes after the prefill
    draft_calls    draft-model forward passes after its prefill (0 for prompt lookup)
    accepted_hist  accepted_hist[n]: row-steps that kept exactly n proposals
    elapsed_s      wall time of the whole call (prefill included)
    """

    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    target_tokens: int = 0
    new_tokens: int = 0
    row_steps: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    accepted_hist: list[int] = field(default_factory=lambda: [0] * (MAX_DRAFT_TOKENS + 1))
    draft_lengths: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the proposals that were kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha(self) -> float:
        """Per-proposal acceptance probability: kept / (kept + rejections), the maximum
        likelihood estimate when acceptances are independent (what the speedup formula
        assumes)."""
        n = self.accepted + self.rejected
        return self.accepted / n if n else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens emitted per sequence per target call."""
        return self.new_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def mean_draft_length(self) -> float:
        return sum(self.draft_lengths) / len(self.draft_lengths) if self.draft_lengths else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        last = max((i for i, c in enumerate(self.accepted_hist) if c), default=0)
        return {"drafted": self.drafted, "accepted": self.accepted, "rejected": self.rejected,
                "target_tokens": self.target_tokens, "new_tokens": self.new_tokens,
                "row_steps": self.row_steps, "target_calls": self.target_calls,
                "draft_calls": self.draft_calls, "acceptance_rate": self.acceptance_rate,
                "alpha": self.alpha, "tokens_per_call": self.tokens_per_call,
                "mean_draft_length": self.mean_draft_length,
                "accepted_hist": self.accepted_hist[:last + 1], "elapsed_s": self.elapsed_s,
                "tokens_per_s": self.tokens_per_s}

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.elapsed_s:.2f} s ({self.tokens_per_s:.1f} "
                f"tok/s); acceptance {self.acceptance_rate:.1%} (alpha {self.alpha:.2f}), "
                f"{self.tokens_per_call:.2f} tokens per target call, "
                f"{self.target_calls} target calls, mean draft length "
                f"{self.mean_draft_length:.1f}")


def predicted_speedup(alpha: float, gamma: float, cost_ratio: float) -> float:
    """Expected speedup of speculative decoding over plain decoding (Leviathan et al. 2023,
    eq. 1 and theorem 3.8): (1 − α^(γ+1)) / ((1 − α)(γc + 1)), with per-token acceptance
    α, γ proposals per step, and c the cost of one draft call relative to one target call
    (0 for prompt lookup)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    expected = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return expected / (gamma * cost_ratio + 1)


def _verify(target_logits, toks, qs, ks, sampling, generator):
    """Per row: (number of proposals kept, the target's token after them).

    target_logits [B, K+1, V]: position j scores the token after the j-th fed token
    (position 0: after the last committed token)."""
    B = target_logits.shape[0]
    temperature = sampling[0]
    if temperature == 0:  # on lists: a Python int per element, not a tensor index
        best = argmax(target_logits).tolist()  # [B][K+1]
        proposed = toks.tolist()
        n_keep, extra = [], []
        for b in range(B):
            n, row, pick = 0, proposed[b], best[b]
            while n < ks[b] and row[n] == pick[n]:
                n += 1
            n_keep.append(n)
            extra.append(pick[n])
        return n_keep, extra
    K1, V = target_logits.shape[1], target_logits.shape[2]
    p = logits_to_probs(target_logits.reshape(B * K1, V), *sampling).view(B, K1, V)
    n_keep, extra = [], []
    for b in range(B):
        n = 0
        token = None
        while n < ks[b]:
            d = int(toks[b, n])
            pd = float(p[b, n, d])
            qd = 1.0 if qs is None else float(qs[b, n, d])
            u = float(torch.rand((), generator=generator, device=p.device))
            if u * qd < pd:  # accept with probability min(1, p/q)
                n += 1
                continue
            if qs is None:  # one-hot q: the residual is p without d
                resid = p[b, n].clone()
                resid[d] = 0
            else:
                resid = (p[b, n] - qs[b, n]).clamp_min(0)
            total = float(resid.sum())
            if total <= 0:  # p <= q everywhere can only happen at p == q: draw from p
                resid = p[b, n]
            token = int(torch.multinomial(resid, 1, generator=generator))
            break
        if token is None:  # every proposal kept: the bonus token from p
            token = int(torch.multinomial(p[b, n], 1, generator=generator))
        n_keep.append(n)
        extra.append(token)
    return n_keep, extra


@torch.inference_mode()
def _check_proposals(toks, qs, ks, asked: list[int], vocab: int) -> None:
    """A drafter's answer against the Drafter protocol, before the target sees it: the
    counts per row within what was asked, the tokens [B, >= max count] inside the
    vocabulary, q (when given) [B, K, vocab]. A ValueError names what is wrong."""
    batch = len(asked)
    if not isinstance(ks, (list, tuple)) or len(ks) != batch or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ValueError(f"drafter.propose must return {batch} proposal counts (ints), got "
                         f"{ks!r}")
    over = [b for b in range(batch) if not 0 <= ks[b] <= asked[b]]
    if over:
        b = over[0]
        raise ValueError(f"drafter.propose returned {ks[b]} proposals for row {b}, asked for "
                         f"at most {asked[b]}")
    if not isinstance(toks, torch.Tensor) or toks.dim() != 2 or toks.shape[0] != batch \
            or toks.shape[1] < max(ks, default=0) or toks.dtype.is_floating_point:
        got = f"{toks.dtype} {list(toks.shape)}" if isinstance(toks, torch.Tensor) else type(toks)
        raise ValueError(f"drafter.propose must return integer tokens [{batch}, >= "
                         f"{max(ks, default=0)}], got {got}")
    k_max = max(ks, default=0)
    if k_max:  # one range check over every row's proposals (past a row's count: 0)
        props = toks[:, :k_max]
        if any(k != k_max for k in ks):
            counts = torch.tensor(ks, device=toks.device)[:, None]
            props = torch.where(torch.arange(k_max, device=toks.device) < counts, props, 0)
        lo, hi = torch.aminmax(props)
        if int(lo) < 0 or int(hi) >= vocab:  # name the first row at fault
            b = next(b for b in range(batch)
                     if int(props[b].min()) < 0 or int(props[b].max()) >= vocab)
            raise ValueError(f"drafter.propose returned token ids {toks[b, :ks[b]].tolist()} "
                             f"for row {b}, outside the vocabulary [0, {vocab})")
    if qs is not None and (not isinstance(qs, torch.Tensor) or qs.dim() != 3
                           or qs.shape[0] != batch or qs.shape[1] < max(ks, default=0)
                           or qs.shape[2] != vocab):
        got = list(qs.shape) if isinstance(qs, torch.Tensor) else type(qs).__name__
        raise ValueError(f"drafter.propose must return q [{batch}, >= {max(ks, default=0)}, "
                         f"{vocab}] or None, got {got}")


@torch.inference_mode()
def assisted_generate(model, draft_model, input_ids: torch.Tensor, max_new_tokens: int,
                      num_draft_tokens: int = 5, schedule: str = "heuristic",
                      temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None,
                      eos_token_id: int | Sequence[int] | None = None,
                      pad_token_id: int | None = None,
                      attention_mask: torch.Tensor | None = None,
                      cache_storage: str = "native", draft_cache_storage: str | None = None,
                      max_ngram: int = 3,
                      stream: Callable[[list[torch.Tensor]], object] | None = None,
                      seed: int | None = None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, AssistedStats]:
    """Generate with a drafter proposing tokens that ``model`` verifies in one pass.

    Parameters
    ----------
    model : the target (a :class:`~llmcore.models.Transformer`)
    draft_model : the drafter, one of
        a Transformer sharing the target's tokenizer (a smaller model, or
        :func:`self_draft` of the target); ``"prompt_lookup"`` (or ``None``): n-gram
        matches against the prompt and the text so far; or any
        :class:`~llmcore.generation.drafters.Drafter`.
    input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id,
    pad_token_id, cache_storage, seed, generator : as in :func:`~llmcore.generation.generate`
    num_draft_tokens : int
        Proposals per step γ (the starting value with ``schedule="heuristic"``), 1..15.
    schedule : ``"heuristic"`` (γ += 2 after a step where every running sequence kept all
        its proposals, else γ −= 1, within [1, 15]) or ``"constant"``.
    draft_cache_storage : the draft model's KV cache storage (default: ``cache_storage``)
    max_ngram : longest n-gram prompt lookup matches
    stream : callable, optional
        Called after each step with a list of one LongTensor per sequence holding the
        tokens it emitted in that step (possibly none).

    Returns
    -------
    (tokens, stats): tokens as :func:`generate` returns them (LongTensor [batch,
    prompt_len + n_new], rows that stopped early padded as ``generate`` pads them:
    :func:`~llmcore.generation.generate.pad_token`), and :class:`AssistedStats`. Runs
    under ``torch.inference_mode`` as :func:`generate` does (the fused CPU decode path
    needs it: with gradients recorded, a quantised target's every linear would go through
    autograd and re-lay its tiled weight out on each call).
    """
    t0 = time.perf_counter()
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) \
            or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got "
                         f"{num_draft_tokens!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    eos_ids, starts, lengths = check_generation_inputs(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
        pad_token_id, attention_mask, stream, seed, generator)
    eos = set(eos_ids)
    batch = input_ids.shape[0]
    cfg = model.config
    vocab = cfg.vocab_size
    device = model.device
    ids_cpu = input_ids.to("cpu", torch.int64)
    seqs = [ids_cpu[b, s:s + n].tolist() for b, (s, n) in enumerate(zip(starts, lengths,
                                                                         strict=True))]
    longest = max(lengths)
    stats = AssistedStats()
    if max_new_tokens == 0:
        stats.elapsed_s = time.perf_counter() - t0
        return input_ids.clone(), stats

    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    sampling = (float(temperature), top_k, top_p)
    room = longest + max_new_tokens + MAX_DRAFT_TOKENS + 2  # padded rows may run past
    if draft_model is None or (isinstance(draft_model, str) and draft_model == "prompt_lookup"):
        drafter = PromptLookupDrafter(max_ngram)
    elif isinstance(draft_model, str):
        raise ValueError(f"draft_model must be a model, 'prompt_lookup' or None, got "
                         f"{draft_model!r}")
    elif isinstance(draft_model, Drafter):
        drafter = draft_model
    else:
        if draft_model is model:
            raise ValueError("draft_model is the target itself; use self_draft(model) for a "
                             "quantised copy, or prompt lookup")
        drafter = ModelDrafter(draft_model, batch, room, draft_cache_storage or cache_storage,
                               vocab)
    if generator is not None and isinstance(drafter, ModelDrafter) \
            and drafter.device != generator.device:
        raise ValueError(f"the draft model is on {drafter.device} and the generator on "
                         f"{generator.device}; put both models on one device")

    cache = model.new_cache(batch, room, storage=cache_storage)
    feed(model, cache, [s[:-1] for s in seqs], device, prefill=True, logits=False)
    drafter.prefill(seqs)
    base_draft_calls = drafter.calls

    n_new = [0] * batch
    done = [False] * batch
    gamma = num_draft_tokens
    while not all(done):
        # proposals wanted per row: never past max_new_tokens (the target adds one more)
        ks = [0 if done[b] else min(gamma, max_new_tokens - n_new[b] - 1) for b in range(batch)]
        if any(k > 0 for k in ks):
            asked = ks
            toks, qs, ks = drafter.propose(seqs, ks, sampling, generator)
            _check_proposals(toks, qs, ks, asked, vocab)
        else:
            toks, qs = torch.zeros(batch, 0, dtype=torch.int64), None
        toks_cpu = toks.to("cpu")
        proposed = toks_cpu.tolist()
        fed = [[] if done[b] else [seqs[b][-1]] + proposed[b][:ks[b]] for b in range(batch)]
        logits = feed(model, cache, fed, device)  # [B, K+1, V]
        stats.target_calls += 1
        n_keep, extra = _verify(logits, toks_cpu, qs, ks, sampling, generator)
        emitted: list[list[int]] = []
        full = any(k > 0 for k in ks)
        for b in range(batch):
            if done[b]:
                emitted.append([])
                continue
            n = n_keep[b]
            new = proposed[b][:n] + [extra[b]]
            # stop at the first EOS (proposals after it are dropped)
            cut = next((i for i, t in enumerate(new) if t in eos), None)
            if cut is not None:
                new = new[:cut + 1]
                done[b] = True
            kept = min(n, len(new))
            stats.drafted += ks[b]
            stats.accepted += kept
            stats.target_tokens += len(new) - kept
            stats.rejected += int(n < ks[b] and len(new) > n)
            stats.accepted_hist[kept] += 1
            stats.row_steps += 1
            stats.draft_lengths.append(ks[b])
            full = full and (ks[b] == 0 or n == ks[b])
            seqs[b].extend(new)
            n_new[b] += len(new)
            if n_new[b] >= max_new_tokens:
                done[b] = True
            emitted.append(new)
        # both caches: keep every committed token but the last
        cache.rollback([len(s) - 1 for s in seqs])
        drafter.commit([len(s) for s in seqs])
        stats.new_tokens += sum(len(e) for e in emitted)
        if stream is not None:
            stream([torch.tensor(e, dtype=torch.int64) for e in emitted])
        if schedule == "heuristic" and any(k > 0 for k in ks):
            gamma = min(gamma + 2, MAX_DRAFT_TOKENS) if full else max(gamma - 1, 1)
    stats.draft_calls = drafter.calls - base_draft_calls
    out = finish_batch(input_ids, [s[n:] for s, n in zip(seqs, lengths, strict=True)],
                       pad_token(eos_ids, pad_token_id))
    stats.elapsed_s = time.perf_counter() - t0
    return out, stats
