"""Losses as pure functions of tensors, each with its formula, so they can be checked
alone against values computed from the definition.

Language modelling:

* ``cross_entropy(logits, labels, ignore_index=-100)`` — mean over counted tokens of
  −log softmax(logits)[label]; with ``reduction="sum"`` the sum (what perplexity and bits
  per byte accumulate over many batches).
* ``perplexity(nll_sum, tokens)`` = exp(nll_sum / tokens).
* ``bits_per_byte(nll_sum, n_bytes)`` = nll_sum / n_bytes / ln 2 — comparable across
  tokenizers and with compressors, since it counts the bytes of the text, not tokens.
* ``sequence_logprobs(logits, labels, mask, average=False)`` — Σ_t mask_t · log p(label_t)
  per sequence (÷ Σ mask with ``average=True``); ``packed_sequence_logprobs`` the same
  sums (and counts) for sequences packed into one row with ``cu_seqlens``.

Preference optimisation (inputs are per-example sequence log-probs [B]; Δ = (π_c − ref_c) −
(π_r − ref_r); σ the logistic function). These return per-example losses [B]; the trainer
takes the mean, as TRL does:

* ``preference_loss(..., loss_type, beta, label_smoothing)`` — "dpo": −(1−ε)·logσ(βΔ) −
  ε·logσ(−βΔ); "ipo": (Δ − 1/(2β))²; "hinge": relu(1 − βΔ); "robust": (−(1−ε)·logσ(βΔ) +
  ε·logσ(−βΔ)) / (1 − 2ε); also the implicit rewards β·(π − ref) of chosen and rejected.
* ``slic_loss(chosen_logps, rejected_logps, target_nll, delta, lam)`` — max(0, δ − log P(y⁺)
  + log P(y⁻)) + λ·NLL(y_ref); no reference model.

Reward model: ``bradley_terry_loss(r_chosen, r_rejected, margin, center_coef)`` — the batch
mean of −logσ(r_c − r_r − m) + coef·mean((r_c + r_r)²), a scalar (the centring term is a
batch statistic).

PPO (token tensors [B, T] with a mask [B, T], nonzero on response tokens; every reduction is
a masked mean; masked positions are selected away with ``torch.where`` before any
arithmetic, so NaN/Inf there reach neither an output nor a gradient):

* ``kl_penalty(logprobs, ref_logprobs, kind)`` — per token, k1 = logp − ref, k3 = exp(ref −
  logp) − 1 − (ref − logp).
* ``ppo_rewards(scores, kl, mask, kl_coef)`` — −kl_coef·kl per valid token, + score on each
  row's last valid token, 0 at masked positions.
* ``gae(rewards, values, mask, gamma, lam)`` — δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t +
  γλ·A_{t+1} over the valid tokens (V and A after the last one are 0); returns = A + V;
  both 0 at masked positions.
* ``whiten(x, mask, shift_mean)`` — (x − mean)/sqrt(var + 1e-8) over the masked entries
  (unbiased var); the mean added back with ``shift_mean=False``; 0 at masked positions.
* ``masked_mean(x, mask, dim=None)`` — Σ_mask x / Σ mask (0 where nothing counts).
* ``ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip)`` — r = exp(logp −
  old); masked mean of max(−A·r, −A·clip(r, 1 ± ε)); with clipfrac and approxkl =
  ½·masked mean((logp − old)²).
* ``ppo_value_loss(values, old_values, returns, mask, clip)`` — ½·masked mean of max((V −
  R)², (clip(V, V_old ± ε) − R)²); with clipfrac.

The PPO semantics are those of TRL's last PPO trainer (1.0 ``trl/experimental/ppo``; 0.11
``PPOTrainer.compute_advantages``/``loss``); each docstring says where these differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy. logits [..., V] (any float dtype; computed in fp32),
    labels [...] int64 with ``ignore_index`` for positions that do not count.

    mean: Σ −log p(y_t) / #counted (0 when nothing counts, not NaN); sum: Σ −log p(y_t).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} must "
                         "agree on all but the last (vocab) dim")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return flat
    count = (labels != ignore_index).sum().clamp(min=1)
    return flat / count


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean token NLL)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be > 0, got {tokens}")
    return math.exp(nll_sum / tokens)


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Summed token NLL (nats) / UTF-8 bytes / ln 2."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return nll_sum / n_bytes / math.log(2)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Σ_t mask[b, t] · log softmax(logits[b, t])[labels[b, t]] per row b -> [B] fp32.

    logits [B, T, V] are aligned with labels [B, T] (shift before calling); mask [B, T]
    is 1 on completion tokens, 0 on prompt and padding. ``average=True`` divides by the
    number of counted tokens of each row (a row with none gives 0).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(f"need logits [B, T, V], labels and mask [B, T]; got "
                         f"{list(logits.shape)}, {list(labels.shape)}, {list(mask.shape)}")
    m = mask.to(torch.float32)
    safe = torch.where(mask.bool(), labels, torch.zeros_like(labels))
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    total = torch.where(mask.bool(), lp, torch.zeros_like(lp)).sum(-1)
    if average:
        return total / m.sum(-1).clamp(min=1)
    return total


def packed_sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                             cu_seqlens: torch.Tensor, ignore_index: int = -100,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of log p(label) over packed sequences -> (sums [n], counts [n]).

    logits [1, total, V] or [total, V] and labels [1, total] or [total] are aligned (label
    t is the token after position t, ``ignore_index`` where nothing counts: prompt tokens,
    and the last token of each sequence); sequence i is rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``. ``sums / counts.clamp(min=1)`` is the length
    average. The same numbers as :func:`sequence_logprobs` on each sequence alone.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if labels.numel() != logits.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} positions, labels {labels.numel()}")
    c = cu_seqlens.to(device=labels.device, dtype=torch.int64)
    if c.dim() != 1 or c.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [n + 1], got {list(cu_seqlens.shape)}")
    counts = c[1:] - c[:-1]
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=labels.device), counts,
                                  output_size=labels.numel())
    m = labels != ignore_index
    lp = -F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    n = counts.numel()
    sums = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, seg, lp)
    kept = torch.zeros(n, dtype=torch.int64, device=lp.device).index_add(0, seg, m.long())
    return sums, kept


# ----------------------------------------------------------------------------- checks

def _floating(name: str, t, dtype: torch.dtype | None = None) -> torch.dtype:
    """Check ``t`` is a floating tensor; return the compute dtype (at least fp32)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return torch.promote_types(dtype or torch.float32, t.dtype)


def _inputs(tensors: dict[str, torch.Tensor], dims: int | None = None) -> list[torch.Tensor]:
    """Check that all ``tensors`` are floating, of one shape (with ``dims`` dims if given);
    return them in one compute dtype (the widest of theirs and fp32)."""
    (first_name, first), *_ = tensors.items()
    dtype = None
    for name, t in tensors.items():
        dtype = _floating(name, t, dtype)
        if dims is not None and t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dim(s), got shape {list(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(first.shape)} "
                             f"like {first_name}")
    return [t.to(dtype) for t in tensors.values()]


def _mask(mask, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """A mask of ``like``'s shape (bool, or numbers where nonzero counts) -> bool."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {list(mask.shape)}, expected {list(like.shape)} "
                         f"like {like_name}")
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_outside(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where m, else 0: selection, not multiplication, so NaN/Inf outside m cannot leak
    (into the value, nor, since later arithmetic sees only finite numbers, the gradient)."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------- preferences

PREFERENCE_LOSS_TYPES = ("dpo", "ipo", "hinge", "robust")


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                    loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise preference losses against a reference model -> (losses [B], chosen_rewards
    [B], rejected_rewards [B]).

    Inputs are sequence log-probs [B] (``sequence_logprobs`` of the completion), all of
    one shape. With Δ = (π_c − ref_c) − (π_r − ref_r), ε = ``label_smoothing``:

    * ``"dpo"``: −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ) (conservative DPO; ε = 0 is plain DPO, ln 2
      when policy = reference). TRL had this up to 0.19; TRL 1.x ignores ε for its sigmoid
      loss, we don't. 0 ≤ ε ≤ 0.5.
    * ``"ipo"``: (Δ − 1/(2β))², minimal at Δ = 1/(2β). The caller passes length-averaged
      log-probs (``sequence_logprobs(..., average=True)``); TRL 1.x divides by the
      completion lengths inside its loss instead, the same thing.
    * ``"hinge"``: relu(1 − βΔ) (SLiC's hinge on the reference-relative margin).
    * ``"robust"``: (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε) (rDPO, unbiased under label
      flips with probability ε); 0 ≤ ε < 0.5, ε = 0 is plain DPO.

    ``label_smoothing`` must be 0 for ipo and hinge (TRL ignores it there silently; a
    nonzero value here is a configuration mistake, so it raises).

    Rewards are the implicit rewards β·(π − ref) of each side, detached (they are logged:
    rewards/chosen, rewards/rejected, margins and accuracies derive from them), as in TRL.
    The losses are per example: the trainer takes the mean.
    """
    pc, pr, rc, rr = _inputs({"policy_chosen_logps": policy_chosen_logps,
                              "policy_rejected_logps": policy_rejected_logps,
                              "ref_chosen_logps": ref_chosen_logps,
                              "ref_rejected_logps": ref_rejected_logps})
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSS_TYPES}, got {loss_type!r}")
    beta = float(beta)
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    eps = float(label_smoothing)
    if loss_type == "dpo" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for 'dpo', got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust', got {eps}")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing applies to 'dpo' and 'robust' only; got {eps} "
                         f"with loss_type {loss_type!r}")
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    delta = chosen_logratios - rejected_logratios
    z = beta * delta
    if loss_type == "dpo":
        losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    else:
        losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def slic_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, target_nll: torch.Tensor,
              delta: float = 1.0, lam: float = 0.1) -> torch.Tensor:
    """SLiC-HF -> per-example losses [B]: max(0, δ − log P(y⁺|x) + log P(y⁻|x)) + λ·NLL(y_ref|x).

    ``chosen_logps``/``rejected_logps`` [B] are the policy's sequence log-probs of the
    preferred and dispreferred completions, ``target_nll`` [B] the policy's NLL of the
    regularisation target (the SFT/reference completion; summed or averaged over its tokens
    as the caller chooses). No reference model. δ ≥ 0, λ ≥ 0. TRL has no SLiC loss of its
    own beyond ``hinge`` (reference-relative, covered by ``preference_loss``).
    """
    c, r, nll = _inputs({"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
                         "target_nll": target_nll})
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return torch.relu(delta - c + r) + lam * nll


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """Reward-model loss (TRL RewardTrainer) -> scalar:
    mean_b[−logσ(r_c − r_r − m)] + coef·mean_b[(r_c + r_r)²].

    ``r_chosen``, ``r_rejected``: the scalar head's rewards, one shape (usually [B]);
    ``margin``: None (m = 0), a number, or a tensor of that shape (a per-pair margin, as in
    Llama 2's reward model); ``center_coef``: None or ≥ 0, the weight of the term that keeps
    rewards centred on 0 (TRL's ``center_rewards_coefficient``, e.g. 0.01). A scalar rather
    than per-example, because the centring term is a batch mean, as in TRL.
    """
    rc, rr = _inputs({"r_chosen": r_chosen, "r_rejected": r_rejected})
    diff = rc - rr
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            m = _inputs({"r_chosen": rc, "margin": margin})[1]
        else:
            m = float(margin)
            if not math.isfinite(m):
                raise ValueError(f"margin must be finite, got {m}")
        diff = diff - m
    loss = -F.logsigmoid(diff).mean()
    if center_coef is not None:
        if not (math.isfinite(center_coef) and center_coef >= 0):
            raise ValueError(f"center_coef must be a finite number >= 0, got {center_coef}")
        loss = loss + center_coef * ((rc + rr) ** 2).mean()
    return loss


# ----------------------------------------------------------------------------- PPO

KL_KINDS = ("k1", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
               ) -> torch.Tensor:
    """Per-token KL(π‖ref) estimates on tokens sampled from π, same shape as the inputs.

    k1 = logp − ref (unbiased, can be negative); k3 = exp(ref − logp) − 1 − (ref − logp)
    (unbiased, ≥ 0, lower variance; Schulman's "Approximating KL divergence", TRL's
    ``kl_estimator``). Elementwise, with no mask: ``ppo_rewards`` selects the valid tokens.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    lp, ref = _inputs({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    if kind == "k1":
        return lp - ref
    logr = ref - lp
    return torch.expm1(logr) - logr


def ppo_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: −kl_coef·kl_t on valid tokens, plus scores[b] on the last
    valid token of row b; 0 at masked positions.

    ``scores`` [B] (reward model score, plus any verifiable reward), ``kl`` [B, T] from
    ``kl_penalty``, ``mask`` [B, T] nonzero on response tokens. A row with no valid token
    gets no reward at all (its score is dropped). Differs from TRL 1.0, which adds the
    score one position after the last response token (its ``sequence_lengths_p1``, a
    position whose value it also keeps): here the episode ends on the last valid token.
    """
    (k,) = _inputs({"kl": kl}, dims=2)
    (s,) = _inputs({"scores": scores}, dims=1)
    if s.shape[0] != k.shape[0]:
        raise ValueError(f"scores has shape {list(s.shape)}, expected [{k.shape[0]}] "
                         f"(one per row of kl {list(k.shape)})")
    m = _mask(mask, "kl", kl)
    dtype = torch.promote_types(k.dtype, s.dtype)
    k, s = k.to(dtype), s.to(dtype)
    pos = torch.arange(k.shape[1], device=k.device)
    last = torch.where(m, pos, -1).amax(dim=1)  # [B], -1 for an empty row
    is_last = pos.unsqueeze(0) == last.unsqueeze(1)
    rewards = _zero_outside(-kl_coef * _zero_outside(k, m), m)
    return rewards + _zero_outside(s.unsqueeze(1).expand_as(k), is_last)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages [B, T], returns [B, T]).

    Over the valid tokens t of a row (mask nonzero), in order:
    δ_t = r_t + γ·V_{t'} − V_t, A_t = δ_t + γλ·A_{t'}, t' the next valid token; after the
    last valid token V = A = 0 (the episode ends there). returns = A + V (the value
    target); both are 0 at masked positions. Whiten the advantages with ``whiten`` after.

    As TRL 1.0 (``advantages`` zeroed at padding) for right-padded masks; masked positions
    inside a row are skipped rather than treated as zero-reward steps with V = 0. Compute
    it on rollout tensors under ``torch.no_grad()``, as TRL does.
    """
    r, v = _inputs({"rewards": rewards, "values": values}, dims=2)
    m = _mask(mask, "rewards", rewards)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    r, v = _zero_outside(r, m), _zero_outside(v, m)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[1])):
        mt = m[:, t]
        a = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        out.append(_zero_outside(a, mt))
        next_adv = torch.where(mt, a, next_adv)
        next_value = torch.where(mt, v[:, t], next_value)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, _zero_outside(advantages + v, m)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ_{mask} x / Σ mask over all entries (``dim=None``) or along ``dim``; 0 where nothing
    counts (TRL's masked_mean gives NaN there)."""
    (x,) = _inputs({"x": x})
    m = _mask(mask, "x", x)
    total = _zero_outside(x, m).sum() if dim is None else _zero_outside(x, m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + 1e-8) with μ, σ² the mean and unbiased variance of the masked
    entries (over the whole tensor, as TRL's masked_whiten); μ added back when
    ``shift_mean=False`` (used for rewards). 0 at masked positions.

    Differs from TRL where TRL fails: one valid entry gives σ² = 0 (TRL divides by n − 1 =
    0), none gives all zeros (TRL raises).
    """
    (xs,) = _inputs({"x": x})
    m = _mask(mask, "x", x)
    xs = _zero_outside(xs, m)
    n = m.sum().to(xs.dtype)
    mean = xs.sum() / n.clamp(min=1)
    var = _zero_outside((xs - mean) ** 2, m).sum() / (n - 1).clamp(min=1)
    out = (xs - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return _zero_outside(out, m)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate -> (loss, clipfrac, approxkl), scalars.

    r = exp(logp − logp_old); loss = masked mean of max(−A·r, −A·clip(r, 1 − ε, 1 + ε));
    clipfrac = masked mean of [clipped term > unclipped term]; approxkl = ½·masked
    mean((logp − logp_old)²). ``old_logprobs`` and ``advantages`` are constants of the
    rollout (detached here); clipfrac and approxkl are detached statistics.

    As TRL 1.0 except approxkl, a masked mean here (as TRL 0.11), a plain mean over
    padding too in TRL 1.0 (which underestimates it by the padding fraction).
    """
    lp, old, adv = _inputs({"logprobs": logprobs, "old_logprobs": old_logprobs,
                            "advantages": advantages})
    m = _mask(mask, "logprobs", logprobs)
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    lp = _zero_outside(lp, m)
    old, adv = _zero_outside(old, m).detach(), _zero_outside(adv, m).detach()
    diff = lp - old
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(lp.dtype), m)
        approxkl = 0.5 * masked_mean(diff ** 2, m)
    return loss, clipfrac, approxkl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss -> (loss, clipfrac), scalars.

    V_c = clip(V, V_old − ε, V_old + ε); loss = ½·masked mean of max((V − R)², (V_c − R)²);
    clipfrac = masked mean of [(V_c − R)² > (V − R)²]. ``old_values`` and ``returns`` are
    constants of the rollout (detached here). ε is an absolute bound on the value change
    (TRL's ``cliprange_value``). As TRL 1.0, with the caller's mask (TRL's value mask
    reaches one token past the response, where it placed the score; see ``ppo_rewards``).
    """
    v, old, ret = _inputs({"values": values, "old_values": old_values, "returns": returns})
    m = _mask(mask, "values", values)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    v = _zero_outside(v, m)
    old, ret = _zero_outside(old, m).detach(), _zero_outside(ret, m).detach()
    v_clipped = torch.clamp(v, old - clip, old + clip)
    unclipped = (v - ret) ** 2
    clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(v.dtype), m)
    return loss, clipfrac
