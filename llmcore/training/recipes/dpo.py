"""Preference optimisation on pairs: DPO (with conservative label smoothing), IPO, hinge,
robust DPO (``loss_type`` dpo | ipo | hinge | robust, :func:`preference_loss`), and
SLiC-HF (``loss_type=slic``, :func:`slic_loss`, no reference model).

Each micro-batch packs the chosen and the rejected sequences of ``batch_size`` pairs into
one forward (chosen first), and sums the answer-token log-probs of each sequence
(:func:`packed_sequence_logprobs`); IPO uses their length averages. The reference model
is ``ref_model`` (default: ``init_from``); with ``ref_cache`` (the default) its log-probs
are computed once before training and cached on disk (:mod:`llmcore.training.reference`),
so it is not in memory during training; with ``ref_cache=false`` it runs next to the
policy on every batch. SLiC-HF's regulariser is the mean answer-token NLL of the chosen
answer (the SFT target).

Logged with TRL's names: loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (SLiC: logps/* and logps/accuracies).
Held out: the same loss; ``val_rewards/accuracies`` (implicit reward margin > 0, which is
0 at the start, when policy = reference); ``val_logps/accuracies`` (log P(chosen) >
log P(rejected) under the policy, meaningful before training too); ``val_sft_loss``
(mean answer-token NLL of the chosen answers: the drift of the SFT objective).
"""

from __future__ import annotations

import os
from collections import Counter

import torch
from torch import nn

from llmcore.training.config import TrainConfig
from llmcore.training.losses import preference_loss, slic_loss
from llmcore.training.reference import pair_logprobs

NAMED_CONFIGS: dict[str, dict] = {
    # From the SFT model of the stdlib (init_from=SFT_RUN/final): one epoch of 600 pairs.
    "stdlib": {"steps": 150, "batch_size": 4, "seq_len": 512, "lr": 2e-4, "min_lr": 2e-5,
               "warmup": 10, "weight_decay": 0.0, "eval_every": 75, "eval_before": True, "skip_bad_rows": True,
               "train_rows": 600, "beta": 0.1},
    "tiny": {"steps": 20, "batch_size": 4, "seq_len": 256, "lr": 1e-3, "min_lr": 1e-4,
             "warmup": 2, "eval_every": 10, "eval_before": True},
}


class WithReference:
    """A pair batch source with the cached reference log-probs of each pair attached."""

    def __init__(self, batches, ref: dict[str, torch.Tensor]):
        self.batches, self.ref = batches, ref

    def batch(self, step: int, index: int) -> dict:
        return self.attach(self.batches.batch(step, index))

    def attach(self, b: dict) -> dict:
        """``b`` (a pair batch with its ``index``) with the reference log-probs added."""
        i = b["index"]
        b["ref_chosen_logps"] = self.ref["chosen"][i]
        b["ref_rejected_logps"] = self.ref["rejected"][i]
        return b


def _reference(batch: dict, ref_model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if ref_model is None:
        raise ValueError("the batch has no cached reference log-probs and no reference model "
                         "was given")
    with torch.no_grad():
        sums, _ = pair_logprobs(ref_model, batch)
    return sums.chunk(2)


def pair_losses(cfg: TrainConfig, batch: dict, sums: torch.Tensor, counts: torch.Tensor,
                ref_model: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Per-pair losses of ``cfg.loss_type`` and the metrics (TRL's names), from the policy's
    packed sums/counts of a pair batch."""
    pc, pr = sums.chunk(2)
    cc, cr = counts.chunk(2)
    if cfg.loss_type == "slic":
        losses = slic_loss(pc, pr, -pc / cc.clamp(min=1), cfg.slic_delta, cfg.slic_lam)
        d = (pc - pr).detach()
        return losses, {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
                        "logps/accuracies": (d > 0).float().mean(), "logps/margins": d.mean()}
    rc, rr = _reference(batch, ref_model)
    if cfg.loss_type == "ipo":  # length-averaged log-probs (the counts are the same for both)
        pc, pr = pc / cc.clamp(min=1), pr / cr.clamp(min=1)
        rc, rr = rc / cc.clamp(min=1), rr / cr.clamp(min=1)
    losses, chosen_r, rejected_r = preference_loss(pc, pr, rc.to(pc.dtype), rr.to(pr.dtype),
                                                   cfg.loss_type, cfg.beta, cfg.label_smoothing)
    return losses, {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                    "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                    "rewards/margins": (chosen_r - rejected_r).mean(),
                    "logps/chosen": sums.detach().chunk(2)[0].mean(),
                    "logps/rejected": sums.detach().chunk(2)[1].mean()}


def make_step_fn(cfg: TrainConfig, ref_model: nn.Module | None = None):
    def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean preference loss of the micro-batch's pairs (one packed forward)."""
        sums, counts = pair_logprobs(model, batch)
        losses, metrics = pair_losses(cfg, batch, sums, counts, ref_model)
        return losses.mean(), metrics
    return step_fn


@torch.no_grad()
def evaluate(model: nn.Module, cfg: TrainConfig, pairs: list, idx: list[int],
             ref: dict | None, ref_model: nn.Module | None) -> list[float]:
    """Sums over held-out pairs ``idx``: [loss, rewards accuracy, logps accuracy, margin,
    chosen NLL, chosen tokens, pairs]."""
    from llmcore.training.batching import chunks, pair_batch

    device = next(model.parameters()).device
    out = [0.0] * 7
    for part in chunks(len(idx), cfg.batch_size):
        ids = [idx[j] for j in part]
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in pair_batch(pairs, ids).items()}
        if ref is not None:
            b["ref_chosen_logps"] = ref["chosen"][ids].to(device)
            b["ref_rejected_logps"] = ref["rejected"][ids].to(device)
        sums, counts = pair_logprobs(model, b)
        losses, m = pair_losses(cfg, b, sums, counts, ref_model)
        pc, pr = sums.chunk(2)
        n = len(ids)
        acc = m.get("rewards/accuracies", m.get("logps/accuracies"))
        margin = m.get("rewards/margins", m.get("logps/margins"))
        out[0] += float(losses.sum())
        out[1] += float(acc) * n
        out[2] += float((pc > pr).float().sum())
        out[3] += float(margin) * n
        out[4] += float(-pc.sum())
        out[5] += float(counts.chunk(2)[0].sum())
        out[6] += n
    return out


def load_reference(cfg: TrainConfig, device) -> nn.Module:
    from llmcore.models import Transformer
    from llmcore.training.recipes import posttrain as P

    path = cfg.ref_model or str(P.init_dir(cfg, "dpo"))
    ref = Transformer.from_pretrained(str(path), dtype=torch.float32, backend=cfg.backend)
    return ref.to(device).eval().requires_grad_(False)


def run(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
        stop_at: int | None = None) -> dict:
    """Optimise ``init_from`` on the pairs of ``data`` with ``loss_type`` into ``out``."""
    from llmcore.data.examples import Renderer
    from llmcore.tokenizer import load_tokenizer
    from llmcore.training import distributed as D
    from llmcore.training import reference as R
    from llmcore.training.batching import PairBatches
    from llmcore.training.loop import autocast_for
    from llmcore.training.recipes import posttrain as P

    info = P.start(cfg, out, resume)
    tok_dir = P.tokenizer_dir(cfg, "dpo")
    tok = load_tokenizer(tok_dir)
    stats: Counter = Counter()
    train, val = P.load_rows(cfg, "preference", Renderer(tok, cfg.seq_len), stats, info)
    policy = P.load_policy(cfg, "dpo")
    batches = PairBatches(train, cfg.batch_size, cfg.seed, cfg.grad_accum * info.world_size)
    ref = {"train": None, "val": None}
    ref_model = None
    extra: dict = {"data": {k: int(v) for k, v in stats.items()}}
    if cfg.loss_type != "slic":
        ref_dir = cfg.ref_model or str(P.init_dir(cfg, "dpo"))
        if cfg.ref_cache:
            paths = {s: R.cache_path(ref_dir, p, cfg.dtype, cfg.backend)
                     for s, p in (("train", train), ("val", val))}
            model = load_reference(cfg, info.device) if info.is_main else None
            for split, pairs in (("train", train), ("val", val)):
                if info.is_main:
                    ref[split], hit = R.load_or_compute(paths[split], lambda p=pairs: (
                        R.reference_logprobs(model, p, cfg.batch_size,
                                             lambda: autocast_for(cfg.dtype, info.device),
                                             cfg.progress)))
                    extra[f"ref_cache_{split}"] = {"path": str(paths[split]), "hit": hit}
            del model
            D.barrier(info)
            if not info.is_main:
                ref = {s: R.load_or_compute(paths[s], lambda: None)[0] for s in paths}
            batches = WithReference(batches, ref["train"])
        else:
            ref_model = load_reference(cfg, info.device)

    def eval_fn(m, final: bool) -> dict:
        idx = list(range(len(val)))
        idx = P.shard(P.eval_subset(idx, cfg.eval_rows, cfg.seed, final), info)
        s = D.sum_across(evaluate(m, cfg, val, idx, ref["val"], ref_model), info)
        n = max(s[6], 1.0)
        acc_name = "val_logps/margins" if cfg.loss_type == "slic" else "val_rewards/margins"
        row = {"val_loss": s[0] / n, "val_logps/accuracies": s[2] / n, acc_name: s[3] / n,
               "val_sft_loss": s[4] / max(s[5], 1.0), "val_pairs": int(s[6])}
        if cfg.loss_type != "slic":
            row["val_rewards/accuracies"] = s[1] / n
        return row

    return P.train(cfg, out, policy, make_step_fn(cfg, ref_model), batches, eval_fn, tok_dir,
                   info, resume, stop_at, extra=extra)
