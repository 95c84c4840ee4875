"""Reward model: the decoder with a scalar head (:class:`llmcore.models.RewardModel`),
trained on preference pairs with the Bradley–Terry loss (TRL's RewardTrainer).

Chosen and rejected sequences of a micro-batch are packed into one forward; the reward of
each is the head on its last token. A row's numeric ``margin`` field, when every row of a
batch has one, is the Llama 2 margin m in −logσ(r_c − r_r − m); ``center_coef`` adds TRL's
centring term. Held out: the pair accuracy (r_c > r_r), overall and per label (the stdlib
set's corruption type), and the loss. The model is saved in the Hugging Face
``*ForSequenceClassification`` layout, so ``RewardModel.from_pretrained`` (and
transformers) load it back, and a judge can use it.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import torch
from torch import nn

from llmcore.training.config import TrainConfig
from llmcore.training.losses import bradley_terry_loss

GROUP_LABELS = ("corruption", "category", "type")  # per-group accuracy, the first present

NAMED_CONFIGS: dict[str, dict] = {
    # From the SFT model (init_from=SFT_RUN/final): one epoch of 1200 pairs.
    "stdlib": {"steps": 150, "batch_size": 8, "seq_len": 512, "lr": 5e-4, "min_lr": 5e-5,
               "warmup": 10, "weight_decay": 0.0, "eval_every": 75, "eval_before": True, "skip_bad_rows": True,
               "train_rows": 1200},
    "tiny": {"steps": 20, "batch_size": 4, "seq_len": 256, "lr": 1e-3, "min_lr": 1e-4,
             "warmup": 2, "eval_every": 10, "eval_before": True},
}


def make_step_fn(center_coef: float = 0.0):
    def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Bradley–Terry loss of the micro-batch's pairs, with accuracy and mean rewards."""
        r = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
        rc, rr = r.chunk(2)
        loss = bradley_terry_loss(rc, rr, batch.get("margin"), center_coef or None)
        rc, rr = rc.detach(), rr.detach()
        return loss, {"accuracy": (rc > rr).float().mean(), "rewards/chosen": rc.mean(),
                      "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean()}
    return step_fn


@torch.no_grad()
def score_pairs(model: nn.Module, pairs: list, batch_size: int) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """Rewards (chosen [n], rejected [n]) of ``pairs``, ``batch_size`` pairs per forward."""
    from llmcore.training.batching import chunks, pair_batch

    device = next(model.parameters()).device
    rc, rr = [], []
    for idx in chunks(len(pairs), batch_size):
        b = pair_batch(pairs, idx)
        c, r = model(b["input_ids"].to(device), cu_seqlens=b["cu_seqlens"].to(device)).chunk(2)
        rc.append(c.float().cpu())
        rr.append(r.float().cpu())
    if not rc:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(rc), torch.cat(rr)


def group_of(pair) -> str | None:
    return next((str(pair.labels[k]) for k in GROUP_LABELS if k in pair.labels), None)


def load_reward_model(cfg: TrainConfig, pad_token_id: int | None):
    """``init_from`` as a reward model: a reward-model directory as is, a language model
    with a new scalar head (its LM head dropped)."""
    import json

    from llmcore.models import RewardModel, Transformer
    from llmcore.models.hf import REWARD_ARCHITECTURES
    from llmcore.training.recipes import posttrain as P

    path = P.init_dir(cfg, "reward")
    arch = (json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures")
            or [None])[0]
    if arch in REWARD_ARCHITECTURES:
        rm = RewardModel.from_pretrained(str(path), dtype=torch.float32, backend=cfg.backend)
    else:
        torch.manual_seed(cfg.seed)
        rm = RewardModel.from_backbone(Transformer.from_pretrained(
            str(path), dtype=torch.float32, backend=cfg.backend))
    if pad_token_id is not None:  # transformers finds the last token of a padded row by it
        rm.config.extra["pad_token_id"] = pad_token_id
    return P.with_bfp(rm.train(), cfg, exclude=("score",))


def run(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
        stop_at: int | None = None) -> dict:
    """Train a reward model from ``init_from`` on the pairs of ``data`` into ``out``."""
    from llmcore.data.examples import Renderer
    from llmcore.tokenizer import load_tokenizer
    from llmcore.training import distributed as D
    from llmcore.training.batching import PairBatches
    from llmcore.training.recipes import posttrain as P

    info = P.start(cfg, out, resume)
    tok_dir = P.tokenizer_dir(cfg, "reward")
    tok = load_tokenizer(tok_dir)
    stats: Counter = Counter()
    train, val = P.load_rows(cfg, "preference", Renderer(tok, cfg.seq_len), stats, info)
    model = load_reward_model(cfg, tok.pad_token_id)
    batches = PairBatches(train, cfg.batch_size, cfg.seed, cfg.grad_accum * info.world_size)
    groups = sorted({g for g in map(group_of, val) if g is not None})

    def eval_fn(m, final: bool) -> dict:
        rows = P.shard(P.eval_subset(val, cfg.eval_rows, cfg.seed, final), info)
        rc, rr = score_pairs(m, rows, cfg.batch_size)
        right = (rc > rr).float()
        loss = -torch.nn.functional.logsigmoid(rc - rr)
        per = defaultdict(lambda: [0.0, 0.0])
        for p, ok in zip(rows, right.tolist(), strict=True):
            g = group_of(p)
            if g is not None:
                per[g][0] += ok
                per[g][1] += 1
        sums = D.sum_across([float(right.sum()), float(loss.sum()), float(len(rows)),
                             *[x for g in groups for x in per[g]]], info)
        n = max(sums[2], 1.0)
        row = {"val_accuracy": sums[0] / n, "val_loss": sums[1] / n, "val_pairs": int(sums[2])}
        for i, g in enumerate(groups):
            ok, cnt = sums[3 + 2 * i], sums[4 + 2 * i]
            row[f"val_accuracy/{g}"] = ok / cnt if cnt else float("nan")
        return row

    return P.train(cfg, out, model, make_step_fn(cfg.center_coef), batches, eval_fn, tok_dir,
                   info, resume, stop_at, extra={"data": {k: int(v) for k, v in stats.items()}})
