"""Supervised fine-tuning: next-token loss on the answer (assistant) tokens only.

Rows are prompt/response pairs or chat conversations (:mod:`llmcore.data.examples`),
rendered with the tokenizer's chat template. With ``packing`` (the default) the examples
are packed into rows of ``seq_len`` tokens and attend only within themselves
(:mod:`llmcore.training.batching`); the loss is the mean over the answer tokens of the
micro-batch, as TRL's SFTTrainer computes it. ``batch_size`` counts packed rows (or, with
``packing=false``, examples padded to the longest).

Held out: the mean answer-token NLL (``val_loss``) and its perplexity.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
from torch import nn

from llmcore.training.config import TrainConfig
from llmcore.training.losses import cross_entropy

NAMED_CONFIGS: dict[str, dict] = {
    # From the pretrained stdlib model (init_from=RUN/final): 300 steps of 4 packed rows of
    # 512 tokens (~0.6M tokens, about half an epoch), a few minutes on 2 cores.
    "stdlib": {"steps": 300, "batch_size": 4, "seq_len": 512, "lr": 1e-3, "min_lr": 1e-4,
               "warmup": 20, "weight_decay": 0.0, "eval_every": 100, "eval_before": True, "skip_bad_rows": True},
    "tiny": {"steps": 20, "batch_size": 2, "seq_len": 256, "lr": 1e-3, "min_lr": 1e-4,
             "warmup": 2, "eval_every": 10, "eval_before": True},
}


def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean NLL of the answer tokens of the micro-batch (labels -100 elsewhere)."""
    logits = model(batch["input_ids"], cu_seqlens=batch.get("cu_seqlens"))
    return cross_entropy(logits, batch["labels"]), {}


@torch.no_grad()
def evaluate(model: nn.Module, examples: list, seq_len: int, batch_size: int) -> dict:
    """Summed answer-token NLL and token count of ``examples`` (packed batches)."""
    from llmcore.training.batching import pack_bins, packed_batch

    device = next(model.parameters()).device
    bins = pack_bins([len(e) for e in examples], seq_len)
    nll, count = 0.0, 0
    for i in range(0, len(bins), batch_size):
        seqs = [examples[j] for b in bins[i:i + batch_size] for j in b]
        batch = packed_batch(seqs)
        logits = model(batch["input_ids"].to(device), cu_seqlens=batch["cu_seqlens"].to(device))
        labels = batch["labels"].to(device)
        nll += float(cross_entropy(logits, labels, reduction="sum"))
        count += int((labels != -100).sum())
    return {"nll": nll, "tokens": count}


def run(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
        stop_at: int | None = None) -> dict:
    """Fine-tune ``init_from`` on the rows of ``data`` into ``out``."""
    import math

    from llmcore.data.examples import Renderer
    from llmcore.tokenizer import load_tokenizer
    from llmcore.training import distributed as D
    from llmcore.training.batching import SFTBatches
    from llmcore.training.recipes import posttrain as P

    info = P.start(cfg, out, resume)
    tok_dir = P.tokenizer_dir(cfg, "sft")
    tok = load_tokenizer(tok_dir)
    stats: Counter = Counter()
    train, val = P.load_rows(cfg, "sft", Renderer(tok, cfg.seq_len), stats, info)
    model = P.load_policy(cfg, "sft")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = SFTBatches(train, cfg.batch_size, cfg.seq_len, cfg.seed,
                         cfg.grad_accum * info.world_size, cfg.packing, pad)

    def eval_fn(m, final: bool) -> dict:
        rows = P.eval_subset(val, cfg.eval_rows, cfg.seed, final)
        r = evaluate(m, P.shard(rows, info), cfg.seq_len, cfg.batch_size)
        nll, count = D.sum_across([r["nll"], float(r["tokens"])], info)
        loss = nll / max(count, 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_tokens": int(count)}

    extra = {"data": {k: int(v) for k, v in stats.items()},
             "packing": {"bins": len(batches.groups), "examples": len(train),
                         "fill": sum(len(e) for e in train) / (len(batches.groups) * cfg.seq_len)
                         if cfg.packing else None}}
    return P.train(cfg, out, model, step_fn, batches, eval_fn, tok_dir, info, resume, stop_at,
                   extra=extra)
