"""What the post-training recipes (SFT, reward model, preference optimisation) share: the
starting model and its tokenizer, the rows (the stdlib sets, a folder with train/val
JSONL, or files with a held-out share), and running the one loop into a run directory
with a summary of the held-out metrics before and after.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from pathlib import Path

import torch

from llmcore.training.config import TrainConfig


def init_dir(cfg: TrainConfig, recipe: str) -> Path:
    """The starting model's directory (``init_from``), checked."""
    if cfg.init_from is None:
        raise ValueError(f"config key 'init_from' is required for {recipe}: the model directory "
                         "to start from (e.g. RUN/final of a pretraining run, or a Hugging Face "
                         "Llama/Qwen2 directory)")
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"config key 'init_from': {path} is not a model directory (no "
                                "config.json)")
    return path


def tokenizer_dir(cfg: TrainConfig, recipe: str) -> Path:
    """``tokenizer`` if set, else the starting model's directory; must hold tokenizer.json."""
    path = Path(cfg.tokenizer) if cfg.tokenizer else init_dir(cfg, recipe)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: set config key 'tokenizer' to a "
                                "tokenizer directory")
    return path


def load_policy(cfg: TrainConfig, recipe: str):
    """The Transformer to train: ``init_from`` in fp32 on the CPU (the loop moves it), with
    trainable BFP linears when ``bfp`` is set."""
    from llmcore.models import Transformer
    from llmcore.nn import quantize_model

    model = Transformer.from_pretrained(str(init_dir(cfg, recipe)), dtype=torch.float32,
                                        backend=cfg.backend)
    return with_bfp(model.train(), cfg, quantize_model)


def with_bfp(model, cfg: TrainConfig, quantize_model=None, exclude=()):
    if cfg.bfp is None:
        return model
    if quantize_model is None:
        from llmcore.nn import quantize_model
    tied = ("lm_head",) if model.config.tie_embeddings else ()
    quantize_model(model, cfg.bfp, act_format=cfg.bfp if cfg.bfp_act else None,
                   exclude=(*tied, *exclude), trainable=True)
    return model


def data_paths(cfg: TrainConfig, kind: str) -> tuple[list[str], list[str] | None]:
    """(train files, val files or None) of ``cfg.data`` / ``cfg.val_data``: "stdlib" is the
    stdlib set of ``kind`` (built once, cached); a folder holding train.jsonl uses it and
    its val.jsonl."""
    from llmcore.data.prepare import ensure_stdlib_task

    data = cfg.data
    if data == "stdlib" or data == ["stdlib"]:
        d = ensure_stdlib_task(kind, cfg.val_fraction, cfg.progress)
        data = [str(d)]
    paths = [data] if isinstance(data, str) else list(data)
    val = cfg.val_data
    val = [val] if isinstance(val, str) else (list(val) if val else None)
    if len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "train.jsonl").is_file():
        folder = Path(paths[0])
        paths = [str(folder / "train.jsonl")]
        if val is None and (folder / "val.jsonl").is_file():
            val = [str(folder / "val.jsonl")]
    return paths, val


def load_rows(cfg: TrainConfig, kind: str, renderer, stats: Counter, info=None
              ) -> tuple[list, list]:
    """(train, val) encoded rows of ``cfg``: checked (``skip_bad_rows``), the held-out share
    split off by row hash when no val files are given, ``train_rows`` > 0 keeping a seeded
    subset of the training rows."""
    from llmcore.data.examples import encode_rows, read_rows, row_split
    from llmcore.training import distributed as D

    if info is not None and info.enabled:  # rank 0 builds (and caches) a stdlib set first
        if info.is_main:
            data_paths(cfg, kind)
        D.barrier(info)
    train_paths, val_paths = data_paths(cfg, kind)
    rows = read_rows(train_paths, kind, cfg.skip_bad_rows, stats)
    if val_paths is None:
        val_rows = [r for r in rows if row_split(r.data, cfg.val_fraction) == "val"]
        rows = [r for r in rows if row_split(r.data, cfg.val_fraction) != "val"]
    else:
        val_rows = read_rows(val_paths, kind, cfg.skip_bad_rows, stats)
    if cfg.train_rows and cfg.train_rows < len(rows):
        g = torch.Generator().manual_seed(cfg.seed)
        keep = sorted(torch.randperm(len(rows), generator=g)[:cfg.train_rows].tolist())
        rows = [rows[i] for i in keep]
    train = encode_rows(rows, renderer, kind, cfg.skip_bad_rows, stats)
    val = encode_rows(val_rows, renderer, kind, cfg.skip_bad_rows, stats)
    if not train:
        raise ValueError(f"no usable training rows in {train_paths}")
    if not val:
        raise ValueError(f"no held-out rows (val_data={val_paths}, val_fraction="
                         f"{cfg.val_fraction}): give val_data or raise val_fraction")
    if stats.get("skipped") and cfg.progress:
        print(f"skipped {stats['skipped']} bad rows (skip_bad_rows)", flush=True)
    stats["train"], stats["val"] = len(train), len(val)
    return train, val


def eval_subset(items: list, n: int, seed: int, final: bool) -> list:
    """The held-out rows of an evaluation: all of them at the end of the run (or when
    ``n`` is 0), else a fixed seeded subset of ``n`` (the same at every evaluation)."""
    if final or not n or n >= len(items):
        return items
    g = torch.Generator().manual_seed(seed)
    return [items[i] for i in sorted(torch.randperm(len(items), generator=g)[:n].tolist())]


def shard(items: list, info) -> list:
    """This rank's share of ``items`` for an evaluation reduced with ``sum_across``."""
    return items[info.rank::info.world_size] if info.enabled else items


def write_summary(run_dir: Path, extra: dict) -> dict:
    """``RUN_DIR/summary.json``: the held-out metrics of the starting model (step 0) and
    the last evaluation, the config, data counts and the machine."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    val = [r for r in rows if r.get("split") == "val"]
    train = [r for r in rows if r.get("split") != "val"]
    tps = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    out = {"recipe": cfg["recipe"], "config": cfg,
           "before": val[0] if val and val[0]["step"] == 0 else None,
           "after": val[-1] if val else None, "steps": train[-1]["step"] if train else 0,
           "tokens": train[-1]["tokens"] if train else 0,
           "tokens_per_s_median": tps[len(tps) // 2] if tps else None, **extra,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(),
                       "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else None}}
    (run_dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def train(cfg: TrainConfig, out: str | os.PathLike, model, step_fn, batches, eval_fn,
          tok_dir: Path, info, resume: bool, stop_at: int | None, tokens_per_batch: int = 0,
          extra: dict | None = None) -> dict:
    """Run the one loop and write the summary when the run is complete."""
    from llmcore.training.loop import Trainer
    from llmcore.training.recipes.pretrain import flops_per_token

    trainer = Trainer(cfg, model, step_fn, batches, out, eval_fn=eval_fn,
                      tokens_per_batch=tokens_per_batch, tokenizer_dir=tok_dir,
                      flops_per_token=flops_per_token(model.config, cfg.seq_len), dist=info)
    result = trainer.fit(resume=resume, stop_at=stop_at)
    if info.is_main and trainer.step == cfg.steps:
        result["summary"] = write_summary(out, extra or {})
    return result


def start(cfg: TrainConfig, out: str | os.PathLike, resume: bool):
    """Distributed setup and the run-folder checks, before any data work (fail fast)."""
    from llmcore.training import distributed as D
    from llmcore.training.loop import check_run_dir, resume_compatible

    info = D.setup()
    check_run_dir(Path(out), resume)
    if resume:
        resume_compatible(Path(out), cfg)
    return info


__all__ = ["data_paths", "eval_subset", "init_dir", "load_policy", "load_rows", "shard", "start",
           "tokenizer_dir", "train", "with_bfp", "write_summary"]
