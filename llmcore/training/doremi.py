"""DoReMi: domain weights from a proxy model trained with Group DRO against a reference.

Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining"
(NeurIPS 2023). Given k domains, a reference model trained on the baseline mixture and a
proxy of the same size, each proxy step t

1. computes the per-domain excess loss on the batch,
   ``λ_t[d] = Σ_{tokens i of domain d} max(ℓ_proxy,i − ℓ_ref,i, 0) / (tokens of d)``
   (clipped per token, then averaged over the domain's tokens, as the reference code);
2. updates the weights by exponentiated gradient ascent and smooths them toward uniform,
   ``α'_t ∝ α_{t−1} · exp(η λ_t)``, ``α_t = (1 − c) α'_t + c / k``
   (:func:`update_domain_weights`; η = 1, c = 1e-3 as the paper's runs: the reference
   code's default c is 1e-4);
3. trains the proxy on ``Σ_d α_t[d] · mean loss of domain d`` (:func:`weighted_domain_loss`).

The result is the average ``ᾱ = (1/T) Σ_t α_t`` (:class:`DomainWeights`), used as the
mixture of the final run.

**A domain absent from the batch** carries no information at step t. The reference code
keeps each domain's last excess loss, initialised to log(vocab size) — on step one a
domain missing from the first batch gets a score of ~8 nats against the others' ~0 and
its weight jumps to ~1. Here an absent domain's weight is left as it was: the update is
applied to the present domains only, renormalised to the mass they held
(``present=`` of :func:`update_domain_weights`), then smoothed as usual. A domain never
seen keeps its initial weight until it is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


def _as_vector(x, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of numbers ({e})") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {list(t.shape)}")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name}[{bad[0]}] is {t[bad[0]].item()}: every value must be finite")
    return t


def update_domain_weights(weights, excess_losses, eta: float = 1.0, smoothing: float = 1e-3,
                          present: Sequence[bool] | torch.Tensor | None = None) -> torch.Tensor:
    """One DoReMi step: ``w' ∝ w · exp(η · excess)``, then ``(1 − c) · w' + c / k``.

    Computed in log space (``log w + η·excess`` minus its logsumexp), so large excess
    losses cannot overflow.

    Parameters
    ----------
    weights : [k] float
        Current weights: finite, >= 0, summing to 1 (within 1e-6).
    excess_losses : [k] float
        Per-domain excess losses (finite; :func:`domain_excess_losses`).
    eta : float
        Step size η >= 0.
    smoothing : float
        c in [0, 1]: the share of the uniform distribution mixed in.
    present : [k] bool, optional
        Domains seen in the batch. Absent domains keep their weight (their excess loss is
        ignored); the present ones share the mass they held. Default: all present.

    Returns
    -------
    [k] float64 tensor summing to 1.
    """
    w = _as_vector(weights, "weights")
    e = _as_vector(excess_losses, "excess_losses")
    k = w.numel()
    if e.numel() != k:
        raise ValueError(f"excess_losses has {e.numel()} values for {k} weights")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"weights must be >= 0 and sum to 1, got {w.tolist()}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) \
            or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or \
            not 0 <= smoothing <= 1:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
    if present is None:
        mask = torch.ones(k, dtype=torch.bool)
    else:
        mask = torch.as_tensor(present, dtype=torch.bool).cpu()
        if mask.shape != (k,):
            raise ValueError(f"present must have {k} entries, got shape {list(mask.shape)}")
    new = w.clone()
    mass = float(w[mask].sum())
    if mask.any() and mass > 0:
        logits = torch.log(w[mask]) + eta * e[mask]  # log 0 = -inf stays at weight 0
        new[mask] = torch.exp(logits - torch.logsumexp(logits, 0)) * mass
    return (1 - smoothing) * new + smoothing / k


def token_losses(logits: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token NLL ``−log softmax(logits)[label]`` [B, T] float32 (0 where ignored).
    logits [B, T, V], labels [B, T] int64."""
    b, t, v = logits.shape
    out = F.cross_entropy(logits.float().reshape(b * t, v), labels.reshape(b * t),
                          ignore_index=ignore_index, reduction="none")
    return out.view(b, t)


def _domain_sums(values: torch.Tensor, domain_ids: torch.Tensor, num_domains: int,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if domain_ids.dim() != 1 or domain_ids.numel() != values.shape[0]:
        raise ValueError(f"domain_ids must be [B] = [{values.shape[0]}], got "
                         f"{list(domain_ids.shape)}")
    if domain_ids.numel() and (int(domain_ids.min()) < 0 or
                               int(domain_ids.max()) >= num_domains):
        raise ValueError(f"domain_ids must be in [0, {num_domains}), got values "
                         f"{sorted(set(domain_ids.tolist()))}")
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    per_row = (values * m).sum(1)
    rows = m.sum(1)
    sums = torch.zeros(num_domains, dtype=values.dtype, device=values.device)
    counts = torch.zeros(num_domains, dtype=values.dtype, device=values.device)
    sums.index_add_(0, domain_ids.to(values.device), per_row)
    counts.index_add_(0, domain_ids.to(values.device), rows)
    return sums, counts


def domain_excess_losses(proxy_losses: torch.Tensor, ref_losses: torch.Tensor,
                         domain_ids: torch.Tensor, num_domains: int,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain excess loss ``Σ_i max(ℓ_proxy,i − ℓ_ref,i, 0) / n_d`` over domain d's
    tokens (clipped per token, then averaged).

    proxy_losses, ref_losses : [B, T] per-token losses; domain_ids : [B] int64 (each row's
    domain); mask : [B, T] bool, tokens that count (default all).
    Returns (excess [num_domains], token counts [num_domains]); a domain with no tokens has
    excess 0 and count 0 (pass ``counts > 0`` as ``present``)."""
    if proxy_losses.shape != ref_losses.shape or proxy_losses.dim() != 2:
        raise ValueError(f"proxy_losses and ref_losses must both be [B, T], got "
                         f"{list(proxy_losses.shape)} and {list(ref_losses.shape)}")
    clipped = (proxy_losses.detach().float() - ref_losses.detach().float()).clamp_min(0)
    sums, counts = _domain_sums(clipped, domain_ids, num_domains, mask)
    return sums / counts.clamp_min(1), counts


def weighted_domain_loss(losses: torch.Tensor, domain_ids: torch.Tensor, weights,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """The proxy's objective ``Σ_d w_d · L_d / Σ_d w_d`` over the domains d present in the
    batch, L_d the mean per-token loss of domain d (differentiable in ``losses`` [B, T])."""
    w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    sums, counts = _domain_sums(losses, domain_ids, w.numel(), mask)
    present = counts > 0
    means = sums[present] / counts[present]
    wp = w[present]
    return (wp * means).sum() / wp.sum().clamp_min(1e-12)


class DomainWeights:
    """The DoReMi weights of a proxy run: the current α_t, the running sum for ᾱ, and the
    number of updates; ``state_dict`` / ``load_state_dict`` for checkpoints."""

    def __init__(self, names: Sequence[str], initial: Sequence[float] | None = None,
                 eta: float = 1.0, smoothing: float = 1e-3):
        self.names = list(names)
        k = len(self.names)
        self.current = (_as_vector(initial, "initial") if initial is not None
                        else torch.full((k,), 1.0 / k, dtype=torch.float64))
        if self.current.numel() != k:
            raise ValueError(f"initial has {self.current.numel()} weights for {k} domains")
        self.eta, self.smoothing = eta, smoothing
        self.total = torch.zeros(k, dtype=torch.float64)
        self.updates = 0
        self.last_excess = torch.zeros(k, dtype=torch.float64)

    def update(self, excess, present=None) -> torch.Tensor:
        self.current = update_domain_weights(self.current, excess, self.eta, self.smoothing,
                                             present)
        self.last_excess = _as_vector(excess, "excess_losses")
        self.total += self.current
        self.updates += 1
        return self.current

    def average(self) -> torch.Tensor:
        """ᾱ = the mean of α_t over the updates (the current weights before any)."""
        return self.total / self.updates if self.updates else self.current.clone()

    def state_dict(self) -> dict:
        return {"names": self.names, "current": self.current.tolist(),
                "total": self.total.tolist(), "updates": self.updates,
                "eta": self.eta, "smoothing": self.smoothing}

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names:
            raise ValueError(f"the saved domain weights are for domains {state.get('names')}, "
                             f"this run has {self.names}")
        self.current = _as_vector(state["current"], "current")
        self.total = _as_vector(state["total"], "total")
        self.updates = int(state["updates"])

    def to_json(self, path: str | os.PathLike, **extra) -> dict:
        avg = self.average()
        out = {"weights": dict(zip(self.names, avg.tolist(), strict=True)),
               "final": dict(zip(self.names, self.current.tolist(), strict=True)),
               "updates": self.updates, "eta": self.eta, "smoothing": self.smoothing, **extra}
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return out


def plot_domain_weights(metrics_path: str | os.PathLike, out: str | os.PathLike,
                        names: Sequence[str], average: dict | None = None,
                        baseline: dict | None = None) -> Path:
    """PNG of the weights α_t over steps from a proxy run's ``metrics.jsonl`` (the
    ``weight/<domain>`` entries), with the average ᾱ and the baseline as markers.
    Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    rows = [json.loads(x) for x in Path(metrics_path).read_text(encoding="utf-8").splitlines()
            if x.strip()]
    rows = [r for r in rows if r.get("split") != "val" and f"weight/{names[0]}" in r]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    steps = [r["step"] for r in rows]
    last = steps[-1] if steps else 1
    for i, n in enumerate(names):
        color = f"C{i}"
        ax.plot(steps, [r[f"weight/{n}"] for r in rows], lw=1.2, color=color, label=n)
        if average:
            ax.plot([last], [average[n]], "*", ms=11, color=color)
        if baseline:
            ax.plot([0], [baseline[n]], "o", ms=6, mfc="none", color=color)
    ax.set_xlabel("proxy step")
    ax.set_ylabel("domain weight")
    ax.set_title("DoReMi domain weights (o: baseline mixture, *: average, the output)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=min(len(names), 5), fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = ["DomainWeights", "domain_excess_losses", "plot_domain_weights", "token_losses",
           "update_domain_weights", "weighted_domain_loss"]
