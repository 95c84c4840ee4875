"""The one training loop. Every recipe is a config, a batch source and a step function
``step_fn(model, batch) -> (loss, metrics)`` on this loop.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks. The
micro-batch that rank r draws as its m-th of step s is global micro-batch
``r * grad_accum + m`` of step s, and batch sources are pure functions of (step, index):
so a run on 2 ranks sees exactly the batches of a 1-rank run with twice the
accumulation, and a resumed run sees the batches it would have seen uninterrupted.

Per step the loop sets the learning rate (a pure function of the step), runs the
micro-batches under autocast (gradient sync only on the last: ``no_sync`` for DDP,
``set_requires_gradient_sync`` for FSDP2), clips the global gradient norm, steps AdamW,
logs (tqdm; ``metrics.jsonl``; TensorBoard when a writer is installed), evaluates every
``eval_every`` steps and checkpoints every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from llmcore.training import checkpoint as ckpt
from llmcore.training import distributed as D
from llmcore.training.config import TrainConfig
from llmcore.training.optim import decay_start, lr_at, make_optimizer

StepFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, Any]]"]


class BatchSource(Protocol):
    """Batches as a pure function of (step, global micro-batch index)."""

    def batch(self, step: int, index: int) -> dict: ...


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, incompatible resume, ...)."""


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) and, optionally, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        elif resume_step is None:
            self.path.write_text("", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = "val/" if row.get("split") == "val" else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(prefix + k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _as_float(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``step_fn`` on ``model`` into ``run_dir``.

    Parameters
    ----------
    cfg : TrainConfig
    model : nn.Module
        On the CPU; moved to the device here (BFP quantisation, if any, already applied).
    step_fn : (model, batch) -> (loss, metrics)
        ``loss`` a scalar tensor (mean over the micro-batch); ``metrics`` floats or
        scalar tensors, averaged over micro-batches and ranks in the log.
    batches : BatchSource
    run_dir : path
    eval_fn : (model, final: bool) -> dict, optional
        Validation metrics (logged with ``"split": "val"``); called on every rank, so it
        may split the work and reduce (``final``: the end-of-run evaluation).
    sample_fn : (model) -> str, optional
        A generated sample, written to ``samples.jsonl`` at each eval.
    tokens_per_batch : int
        Tokens in one micro-batch (for tokens/s), when the batches do not count their own
        (a batch with an int ``num_tokens`` entry is counted by it; the entry is not passed
        to ``step_fn``).
    tokenizer_dir : path, optional
        Copied into every saved model directory.
    stateful : {name: object}, optional
        Recipe state beyond the model and optimizer (e.g. DoReMi's domain weights): each
        object's ``state_dict()`` (JSON) is saved in every checkpoint and handed back to
        its ``load_state_dict`` on resume. A batch source with ``state_dict`` is saved the
        same way (under ``data``), so it can refuse a resume with different data.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, step_fn: StepFn,
                 batches: BatchSource, run_dir: str | os.PathLike, *,
                 eval_fn: Callable[[nn.Module], dict] | None = None,
                 sample_fn: Callable[[nn.Module], str] | None = None,
                 tokens_per_batch: int = 0, tokenizer_dir: str | os.PathLike | None = None,
                 flops_per_token: float | None = None, dist: D.DistInfo | None = None,
                 stateful: dict[str, Any] | None = None):
        self.cfg, self.step_fn, self.batches = cfg, step_fn, batches
        self.stateful = dict(stateful or {})
        self.run_dir = Path(run_dir)
        self.eval_fn, self.sample_fn = eval_fn, sample_fn
        self.tokens_per_batch, self.tokenizer_dir = tokens_per_batch, tokenizer_dir
        self.flops_per_token = flops_per_token
        self.dist = dist or D.setup()
        self.raw_model = model.to(self.dist.device)
        self.model = self.raw_model
        self.step = 0
        self.tokens = 0

    # -- pieces ------------------------------------------------------------------------
    def _autocast(self):
        return autocast_for(self.cfg.dtype, self.dist.device)

    def _sync_context(self, last_micro: bool):
        m = self.model
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        if hasattr(m, "no_sync") and not last_micro:  # DDP
            return m.no_sync()
        return contextlib.nullcontext()

    def state(self) -> dict:
        data: dict[str, Any] = {"step": self.step}
        if hasattr(self.batches, "state_dict"):
            data["sampler"] = self.batches.state_dict()
        out = {"step": self.step, "tokens": self.tokens, "data": data,
               "world_size": self.dist.world_size, "config": self.cfg.to_dict()}
        if self.stateful:
            out["extra"] = {k: v.state_dict() for k, v in self.stateful.items()}
        return out

    def _load_extra(self, path: Path, state: dict) -> None:
        try:
            sampler = state.get("data", {}).get("sampler")
            if sampler is not None and hasattr(self.batches, "load_state_dict"):
                self.batches.load_state_dict(sampler)
            for k, obj in self.stateful.items():
                if k not in state.get("extra", {}):
                    raise ValueError(f"it holds no {k!r} state")
                obj.load_state_dict(state["extra"][k])
        except ValueError as e:
            raise TrainingError(f"cannot resume from {path}: {e}") from None

    def save(self, path: Path) -> None:
        if self.cfg.parallel == "fsdp" and self.dist.enabled:
            self._save_sharded(path)
            return
        if self.dist.is_main:
            ckpt.save_checkpoint(path, self.model, self.optimizer, self.state(),
                                 self.tokenizer_dir)
        D.barrier(self.dist)

    def _checkpoint(self) -> None:
        self.save(self.run_dir / "checkpoints" / f"step_{self.step}")
        if self.dist.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_last)

    def _save_sharded(self, path: Path) -> None:
        """FSDP2: every rank writes its shards with torch.distributed.checkpoint (DCP);
        rank 0 also writes the full model as an HF directory and the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        full = ckpt.full_state_dict(self.model)
        tmp = path.parent / f".{path.name}.dcp-tmp"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        D.barrier(self.dist)
        if self.dist.is_main:
            with ckpt.atomic_directory(path) as out:
                os.replace(tmp / "dcp", out / "dcp")
                ckpt.export_model(self.model, out, self.tokenizer_dir, state=full)
                st = {**self.state(), "sharded": True, "python_rng": None}
                (out / ckpt.STATE_FILE).write_text(json.dumps(st, indent=1) + "\n")
            tmp.rmdir()
        D.barrier(self.dist)

    def _load_sharded(self, path: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])
        return json.loads((path / ckpt.STATE_FILE).read_text())

    def _resume(self) -> int | None:
        found = ckpt.list_checkpoints(self.run_dir)
        if not found:
            return None
        path = found[-1]
        if self.cfg.parallel == "fsdp" and self.dist.enabled:
            state = self._load_sharded(path)
        else:
            state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        if state.get("world_size", 1) != self.dist.world_size:
            raise TrainingError(f"{path} was written by {state.get('world_size')} ranks; this "
                                f"run has {self.dist.world_size}")
        self._load_extra(path, state)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        return self.step

    # -- the loop ----------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or stop after step ``stop_at``, for tests and resumable
        jobs cut into pieces); returns the last train and val metrics."""
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.dist
        check_run_dir(self.run_dir, resume)
        torch.manual_seed(cfg.seed)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.model = D.wrap(self.model, info, cfg.parallel)
        self.optimizer = make_optimizer(self.raw_model, cfg.lr, cfg.weight_decay,
                                        (cfg.beta1, cfg.beta2), cfg.eps)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        resumed = self._resume() if resume else None
        log = MetricsLog(self.run_dir, info.is_main, cfg.tensorboard, resumed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (info.is_main and cfg.progress),
                   unit="step", dynamic_ncols=True)
        last_train: dict = {}
        last_val: dict = {}
        if self.eval_fn is not None and cfg.eval_before and self.step == 0:
            # the starting model, at step 0, evaluated as fully as the end of the run
            last_val = self.evaluate(log, bar, final=True)
        t_last, tokens_last = time.perf_counter(), self.tokens
        self.model.train()
        try:
            while self.step < end:
                step = self.step
                lr = lr_at(step, steps=cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr,
                           warmup=cfg.warmup, schedule=cfg.schedule, decay_frac=cfg.decay_frac)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                micro = [self.batches.batch(step, info.rank * cfg.grad_accum + m)
                         for m in range(cfg.grad_accum)]
                sums, grad_norm = train_step(self.model, self.optimizer, params, self.step_fn,
                                             micro, clip=cfg.clip, device=info.device,
                                             autocast=self._autocast,
                                             sync_context=self._sync_context)
                self.step += 1
                names = sorted(sums)
                means = D.sum_across([sums[k] / cfg.grad_accum for k in names], info)
                row = {k: v / info.world_size for k, v in zip(names, means, strict=True)}
                counted = row.pop("num_tokens", None)  # batches that say how many they hold
                self.tokens += round(counted * cfg.grad_accum * info.world_size) \
                    if counted is not None else \
                    self.tokens_per_batch * cfg.grad_accum * info.world_size
                if not math.isfinite(row["loss"]):
                    raise TrainingError(f"loss is {row['loss']} at step {self.step}: lower lr, "
                                        "check the data, or set clip (the last checkpoint "
                                        "is intact)")
                now = time.perf_counter()
                tps = (self.tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, self.tokens
                last_train = {"step": self.step, "tokens": self.tokens, **row, "lr": lr,
                              "grad_norm": grad_norm, "tokens_per_s": tps}
                if self.flops_per_token and info.device.type == "cuda":
                    last_train["mfu"] = mfu(tps * self.flops_per_token / info.world_size,
                                             info.device)
                if self.step % cfg.log_every == 0 or self.step == end:
                    log.write(last_train)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tps:,.0f}", refresh=False)
                final = self.step == cfg.steps
                if self.eval_fn is not None and (final or (cfg.eval_every and
                                                           self.step % cfg.eval_every == 0)):
                    last_val = self.evaluate(log, bar, final)
                if self.step < end and cfg.save_every and self.step % cfg.save_every == 0:
                    self._checkpoint()
            self._checkpoint()  # the end of this run (or of the piece that stop_at cut)
            if self.step == cfg.steps:
                full = ckpt.full_state_dict(self.model)  # a collective under FSDP
                if info.is_main:
                    ckpt.export_model(self.model, self.run_dir / "final", self.tokenizer_dir,
                                      state=full)
                D.barrier(info)
        finally:
            bar.close()
            log.close()
        return {"train": last_train, "val": last_val}

    @torch.no_grad()
    def evaluate(self, log: MetricsLog, bar, final: bool) -> dict:
        self.model.eval()
        try:
            with self._autocast():
                metrics = self.eval_fn(self.raw_model, final)
            row = {"step": self.step, "tokens": self.tokens, "split": "val", **metrics}
            sharded = self.dist.enabled and self.cfg.parallel == "fsdp"
            if self.sample_fn is not None and self.cfg.sample_tokens and (
                    self.dist.is_main or sharded):  # FSDP: every rank joins the gathers
                text = self.sample_fn(self.raw_model)
                if self.dist.is_main:
                    with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": self.step, "text": text}) + "\n")
            log.write(row)
            if self.dist.is_main and self.cfg.progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                  if isinstance(v, float))
                bar.write(f"step {self.step}: {shown}")
            return row
        finally:
            self.model.train()


def autocast_for(dtype: str, device: torch.device):
    """The autocast context of config ``dtype``: bf16 autocast, or none for float32."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list,
               step_fn: StepFn, micro_batches: list[dict], *, clip: float,
               device: torch.device, autocast=contextlib.nullcontext,
               sync_context=None) -> tuple[dict[str, float], float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation): each loss is
    divided by the number of micro-batches; gradients sync on the last one only
    (``sync_context(last)``); the global norm is clipped to ``clip`` (0: off). Returns
    the summed per-micro-batch metrics (loss included) and the gradient norm before
    clipping."""
    n = len(micro_batches)
    sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if "num_tokens" in batch:  # a count for tokens/s, not an input
            batch = dict(batch)
            sums["num_tokens"] = sums.get("num_tokens", 0.0) + float(batch.pop("num_tokens"))
        ctx = sync_context(i == n - 1) if sync_context is not None else contextlib.nullcontext()
        with ctx, autocast():
            loss, metrics = step_fn(model, batch)
        (loss / n).backward()
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + _as_float(v)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    norm = _as_float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, norm


# Dense bf16 tensor-core peaks (FLOP/s) for MFU; extend as devices are measured.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def mfu(flops_per_s: float, device: torch.device) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's dense bf16 peak (NaN for
    a GPU not in the table)."""
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)
    return flops_per_s / peak if peak else float("nan")


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> None:
    """A new run must not write over another run's checkpoints or model; ``--resume``
    needs something to resume."""
    run_dir = Path(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    if not resume and (found or (run_dir / "final").exists()):
        raise TrainingError(f"{run_dir} already holds a training run: continue it with "
                            "--resume, or choose another --out")
    if resume and not found:
        raise TrainingError(f"--resume: {run_dir} has no complete checkpoint to continue "
                            "from")


def resume_compatible(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose saved config differs (except progress/logging keys)."""
    f = run_dir / "config.json"
    if not f.is_file():
        return
    old = json.loads(f.read_text(encoding="utf-8"))
    free = {"progress", "eval_every", "save_every", "keep_last", "log_every", "tensorboard",
            "sample_tokens", "sample_prompt", "eval_tokens"}
    default = TrainConfig().to_dict()  # a key added since the run was saved: its default
    diff = sorted(k for k, v in cfg.to_dict().items()
                  if k not in free and old.get(k, default[k]) != v)
    if diff:
        raise TrainingError(f"cannot resume {run_dir}: config keys differ from the saved run: "
                            f"{', '.join(diff)}")


__all__ = ["BatchSource", "MetricsLog", "StepFn", "Trainer", "TrainingError", "check_run_dir",
           "autocast_for", "decay_start", "mfu", "resume_compatible", "train_step"]
