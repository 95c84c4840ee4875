"""DoReMi: domain weights for a pretraining mixture (``llmcore train doremi``).

Three stages in one run directory, each resumable:

1. ``reference/``: a model trained on the baseline mixture (``doremi.baseline``, default
   ``natural``: the corpus' own token shares), a ``pretrain`` run with
   ``domain_weights`` set; or ``doremi.reference``, a finished run to reuse;
2. ``proxy/``: a model of the same config trained with Group DRO (batches drawn from the
   uniform mixture, as the paper's Algorithm 1; the loss the domains' mean losses weighted
   by the current weights, which move by :func:`~llmcore.training.doremi.
   update_domain_weights` on the per-domain excess loss over the reference);
3. ``domain_weights.json`` (the average of the weights over the proxy's steps: pass it to
   ``llmcore train pretrain --domain-weights``), ``plots/domain_weights.png`` and
   ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from llmcore.training.config import TrainConfig
from llmcore.training.doremi import (
    DomainWeights,
    domain_excess_losses,
    token_losses,
    weighted_domain_loss,
)
from llmcore.training.recipes import pretrain

_MODEL = {"dim": 128, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 352,
          "max_seq_len": 256}

# "stdlib": a 1.6M-parameter model, 500 steps of 16 x 128 tokens (1M tokens): on 2 idle
# CPU cores about 2 minutes for the reference and 3 for the proxy (which also runs the
# reference forward); "tiny" is for tests and smoke runs.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny": {"preset": "tiny", "vocab_size": 1024, "steps": 30, "batch_size": 8,
             "seq_len": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup": 3, "eval_every": 0,
             "eval_tokens": 4096, "sample_tokens": 0, "domains": "stdlib",
             "doremi": {"eval_tokens": 4096},
             "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                       "ffn_dim": 176, "max_seq_len": 128}},
    "stdlib": {"preset": "tiny", "vocab_size": 4096, "steps": 500, "batch_size": 16,
               "seq_len": 128, "lr": 3e-3, "min_lr": 3e-4, "warmup": 50, "eval_every": 100,
               "eval_tokens": 20480, "sample_tokens": 0, "domains": "stdlib",
               "doremi": {"eval_tokens": 32768},
               "model": _MODEL},
}


class ProxyStep:
    """The proxy's ``step_fn``: per-token losses of proxy and reference on the batch, the
    per-domain excess losses, one weight update (summed over ranks first, so every rank
    holds the same weights), and the weighted loss. Logs ``weight/<d>``, ``excess/<d>``
    and ``ce`` (the plain mean loss)."""

    def __init__(self, reference: nn.Module, weights: DomainWeights):
        self.reference, self.weights = reference.eval().requires_grad_(False), weights

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        x, y, dom = batch["input_ids"], batch["labels"], batch["domain"]
        proxy = token_losses(model(x), y)  # [B, T]
        ref_model = self.reference
        if next(ref_model.parameters()).device != x.device:
            self.reference = ref_model = ref_model.to(x.device)
        with torch.no_grad():
            ref = token_losses(ref_model(x), y)
        k = len(self.weights.names)
        excess, counts = domain_excess_losses(proxy, ref, dom, k)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = torch.cat([excess * counts, counts]).double()
            torch.distributed.all_reduce(sums)
            counts = sums[k:]
            excess = sums[:k] / counts.clamp_min(1)
        if not torch.isfinite(excess).all():
            from llmcore.training.loop import TrainingError

            bad = [n for n, e in zip(self.weights.names, excess.tolist(), strict=True)
                   if not math.isfinite(e)]
            raise TrainingError(f"the excess loss of domain(s) {bad} is not finite (a proxy "
                                "or reference loss is inf/nan): lower lr or check the "
                                "reference model")
        w = self.weights.update(excess.double().cpu(), present=(counts > 0).cpu())
        loss = weighted_domain_loss(proxy, dom, w)
        metrics = {"ce": proxy.detach().mean()}
        for i, n in enumerate(self.weights.names):
            metrics[f"weight/{n}"] = float(w[i])
            metrics[f"excess/{n}"] = float(excess[i])
        return loss, metrics


def _stage(run_dir: Path, resume: bool, go) -> dict | None:
    """Run (or resume, or skip when finished) one stage into ``run_dir``."""
    from llmcore.training.checkpoint import list_checkpoints

    if (run_dir / "final").is_dir() and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    result = go(resume and bool(list_checkpoints(run_dir)))
    return result.get("summary")


def _reference_model(ref_dir: Path, tok_dir: Path) -> nn.Module:
    from llmcore.models import Transformer
    from llmcore.tokenizer import tokenizer_hash

    final = ref_dir / "final"
    if not (final / "config.json").is_file():
        raise ValueError(f"config key 'doremi.reference': {ref_dir} holds no finished run "
                         "(no final/config.json)")
    if tokenizer_hash(final) != tokenizer_hash(tok_dir):
        raise ValueError(f"config key 'doremi.reference': {ref_dir} was trained with another "
                         f"tokenizer than this run's ({tok_dir})")
    return Transformer.from_pretrained(str(final))


def run(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
        stop_at: int | None = None) -> dict:
    from llmcore.training import distributed as D
    from llmcore.training.loop import TrainingError

    out = Path(out)
    if not resume and out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} already holds a doremi run: continue it with --resume, "
                            "or choose another --out")
    if cfg.domain_weights is not None:
        raise ValueError("config key 'domain_weights' is not used by the doremi recipe: the "
                         "reference's mixture is doremi.baseline, the proxy samples uniformly")
    if cfg.bfp is not None:
        raise ValueError("config key 'bfp': the doremi recipe trains full-precision models")
    info = D.setup()
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.doremi
    baseline = d.get("baseline", "natural")
    base = dataclasses.replace(cfg, recipe="pretrain", domain_weights=baseline,
                               domains=pretrain.domain_spec(cfg))
    tok_dir, domains = pretrain.prepare_domains(base, cfg.progress and info.is_main)
    base_w = pretrain.resolve_weights(baseline, domains, "doremi.baseline")

    # (1) the reference model on the baseline mixture
    ref_dir = Path(d["reference"]) if d.get("reference") else out / "reference"
    ref_summary = None
    if not d.get("reference"):
        ref_summary = _stage(ref_dir, resume, lambda r: pretrain.run(
            base, ref_dir, resume=r, stop_at=stop_at))
        if ref_summary is None:
            return {"stage": "reference", "val": {}}
    reference = _reference_model(ref_dir, tok_dir)

    # (2) the proxy, Group DRO against the reference
    names = domains.names
    uniform = {n: 1.0 / len(names) for n in names}
    weights = DomainWeights(names, [uniform[n] for n in names], eta=float(d.get("eta", 1.0)),
                            smoothing=float(d.get("smoothing", 1e-3)))
    proxy_cfg = dataclasses.replace(base, domain_weights="uniform")
    proxy_dir = out / "proxy"
    proxy_summary = _stage(proxy_dir, resume, lambda r: pretrain._run_mixture(
        proxy_cfg, proxy_dir, r, stop_at, info, step=ProxyStep(reference, weights),
        stateful={"doremi": weights}, sample_weights=uniform))
    if proxy_summary is None:
        return {"stage": "proxy", "val": {}}
    if weights.updates == 0:  # a finished proxy from an earlier invocation
        from llmcore.training.checkpoint import list_checkpoints

        st = json.loads((list_checkpoints(proxy_dir)[-1] / "trainer_state.json").read_text())
        weights.load_state_dict(st["extra"]["doremi"])

    # (3) the averaged weights, their plot, the summary
    result = {"stage": "done", "val": proxy_summary.get("val") or {}}
    if info.is_main:
        dw = weights.to_json(out / "domain_weights.json", baseline=base_w,
                             proxy_sampling="uniform", domains=pretrain.domain_spec(cfg),
                             train_tokens=domains.num_tokens("train"),
                             reference=str(ref_dir))
        try:
            from llmcore.training.doremi import plot_domain_weights

            plot_domain_weights(proxy_dir / "metrics.jsonl", out / "plots" /
                                "domain_weights.png", names, dw["weights"], base_w)
        except ImportError:
            pass
        summary = {"domain_weights": dw["weights"], "baseline": base_w,
                   "reference": (ref_summary or {}).get("domains"),
                   "proxy": proxy_summary.get("domains")}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n",
                                          encoding="utf-8")
        result["summary"] = summary
        result["weights"] = dw["weights"]
    return result
