"""Training configuration: one dataclass, loaded from named configs, TOML files and
``--set key=value`` overrides, checked field by field with errors that name the key.

Resolution order: the recipe's defaults, then a named config or a TOML file
(``--config``), then each ``--set`` in order. The resolved config is written to the run
directory as ``config.json`` and is what ``--resume`` compares against.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

SCHEDULES = ("cosine", "wsd", "constant")
LOSS_ON = ("all", "generated")
DTYPES = ("float32", "bfloat16")
BACKENDS = ("llmcore", "torch")
PARALLEL = ("ddp", "fsdp")


def _nonneg(v) -> bool:
    return _finite(v) and v >= 0


# doremi.KEY: (check, what it must be)
DOREMI_KEYS = {
    "eta": (_nonneg, "a finite number >= 0"),
    "smoothing": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "reference": (lambda v: isinstance(v, str) and bool(v),
                  "a finished reference run directory"),
    "baseline": (lambda v: isinstance(v, (str, dict)) and bool(v),
                 "'natural', 'uniform', a JSON file or a table {domain = weight}"),
    "eval_tokens": (lambda v: _is_int(v) and v >= 0,
                    "an int >= 0 (held-out tokens per domain in the final evaluation; 0: all)"),
}
LOSS_TYPES = ("dpo", "ipo", "hinge", "robust", "slic")


@dataclass
class TrainConfig:
    """Every knob of a training run (see docs/training.md for each key)."""

    recipe: str = "pretrain"
    # model
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # TransformerConfig overrides, e.g. {"dim": 256}
    init_from: str | None = None  # a model directory to start from (fine-tuning recipes)
    # data
    data: str | list = "stdlib"
    val_fraction: float = 0.05
    tokenizer: str | None = None  # tokenizer directory; None: train one (cached)
    vocab_size: int = 8192  # for a tokenizer trained by the run
    shards: str | None = None  # prepared shard directory; None: prepare (cached)
    loss_on: str = "all"  # pretrain: "all" tokens, or "generated" (distill shards' continuations)
    decay_data: str | list | None = None  # data for the final (decay) phase of "wsd"
    domains: str | dict | None = None  # "stdlib", "field:NAME" or {name = [paths]}
    domain_weights: str | dict | None = None  # the mixture: natural|uniform|FILE.json|{d = w}
    val_data: str | list | None = None  # post-training: held-out rows (else val.jsonl or a split)
    packing: bool = True  # post-training: pack sequences (attention_varlen), no padding
    skip_bad_rows: bool = False  # post-training: skip (and count) unusable rows
    train_rows: int = 0  # post-training: use a seeded subset of this many rows (0: all)
    # preference and reward recipes
    loss_type: str = "dpo"  # dpo | ipo | hinge | robust | slic
    beta: float = 0.1
    label_smoothing: float = 0.0
    slic_delta: float = 1.0  # SLiC calibration margin δ
    slic_lam: float = 0.1  # SLiC weight λ of the NLL of the chosen answer
    ref_model: str | None = None  # reference model directory (default: init_from)
    ref_cache: bool = True  # precompute reference log-probs once, cached on disk
    center_coef: float = 0.0  # reward model: weight of the mean (r_c + r_r)^2 term
    ppo: dict = field(default_factory=dict)  # ppo recipe settings (see docs/training.md)
    doremi: dict = field(default_factory=dict)  # doremi recipe settings (see DOREMI_KEYS)
    # optimisation
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 10
    schedule: str = "cosine"
    decay_frac: float = 0.2  # "wsd": fraction of steps in the final linear decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # max global grad norm; 0 disables clipping
    # numerics and kernels
    dtype: str = "float32"  # autocast dtype: float32 (off) or bfloat16
    bfp: str | None = None  # a BFP format name: BFP in every linear (MX training recipe)
    bfp_act: bool = True  # quantise activations too (W8A8 integer GEMMs) when bfp is set
    backend: str = "llmcore"
    compile: bool = False
    parallel: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2 fully_shard)
    # evaluation, logging and checkpoints
    eval_every: int = 50
    eval_tokens: int = 65536  # val tokens per periodic eval; the final eval reads the split
    eval_rows: int = 0  # post-training: held-out rows per periodic eval (0: all)
    eval_before: bool = False  # evaluate the starting model too (a val row at step 0)
    log_every: int = 1
    sample_tokens: int = 64  # generated at each eval (0: none)
    sample_prompt: str = "def "
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    seed: int = 1234
    tensorboard: bool = True  # when a TensorBoard writer is installed
    progress: bool = True

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ValueError(f"config key {key!r} {what}, got {getattr(self, key)!r}")

        for key in ("steps", "batch_size", "seq_len", "grad_accum", "keep_last", "log_every"):
            need(_is_int(getattr(self, key)) and getattr(self, key) >= 1, key,
                 "must be an int >= 1")
        for key in ("warmup", "eval_every", "save_every", "eval_tokens", "sample_tokens",
                    "seed", "vocab_size", "eval_rows", "train_rows"):
            need(_is_int(getattr(self, key)) and getattr(self, key) >= 0, key,
                 "must be an int >= 0")
        for key in ("lr", "min_lr", "weight_decay", "clip", "eps", "slic_delta", "slic_lam",
                    "center_coef"):
            need(_finite(getattr(self, key)) and getattr(self, key) >= 0, key,
                 "must be a finite number >= 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.min_lr <= self.lr, "min_lr", f"must be <= lr ({self.lr})")
        for key in ("beta1", "beta2", "val_fraction", "decay_frac"):
            need(_finite(getattr(self, key)) and 0 <= getattr(self, key) < 1, key,
                 "must be in [0, 1)")
        need(self.warmup <= self.steps, "warmup", f"must be <= steps ({self.steps})")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {LOSS_TYPES}")
        need(_finite(self.beta) and self.beta > 0, "beta", "must be a finite number > 0")
        need(_finite(self.label_smoothing) and 0 <= self.label_smoothing < 0.5,
             "label_smoothing", "must be in [0, 0.5)")
        need(self.label_smoothing == 0 or self.loss_type in ("dpo", "robust"),
             "label_smoothing", f"applies to loss_type dpo and robust only (loss_type is "
             f"{self.loss_type!r})")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.loss_on in LOSS_ON, "loss_on", f"must be one of {LOSS_ON}")
        need(self.loss_on == "all" or (self.domain_weights is None and self.decay_data is None),
             "loss_on", "must be 'all' with domain_weights or decay_data")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
        need(self.parallel in PARALLEL, "parallel", f"must be one of {PARALLEL}")
        need(isinstance(self.model, dict), "model", "must be a table of model overrides")
        need(isinstance(self.ppo, dict), "ppo", "must be a table of ppo settings")
        need(isinstance(self.doremi, dict), "doremi", "must be a table of doremi settings")
        for k, v in self.doremi.items():
            if k not in DOREMI_KEYS:
                raise ValueError(f"config key 'doremi.{k}' is unknown (doremi keys: "
                                 f"{', '.join(DOREMI_KEYS)})")
            check, what = DOREMI_KEYS[k]
            if not check(v):
                raise ValueError(f"config key 'doremi.{k}' must be {what}, got {v!r}")
        if self.domains is not None:
            from llmcore.data.domains import check_domains_spec

            check_domains_spec(self.domains, self.data)
        w = self.domain_weights
        need(w is None or (isinstance(w, str) and bool(w)) or (isinstance(w, dict) and bool(w)),
             "domain_weights", "must be 'natural', 'uniform', a JSON file or a table "
             "{domain = weight}")
        if isinstance(w, str) and w not in ("natural", "uniform"):
            from llmcore.data.mixture import load_domain_weights

            load_domain_weights(w, "config key 'domain_weights'")  # fail before any work
        if w is not None and self.domains is None and self.data != "stdlib":
            raise ValueError("config key 'domain_weights' needs config key 'domains' (which "
                             "domain each document belongs to)")
        need(isinstance(self.data, (str, list)) and bool(self.data), "data",
             "must be 'stdlib' or a non-empty list of paths")
        if self.bfp is not None:
            from llmcore.formats import get_format

            try:
                get_format(self.bfp)
            except (KeyError, ValueError) as e:
                raise ValueError(f"config key 'bfp': {e}") from None
            need(self.backend == "llmcore", "backend", "must be 'llmcore' when bfp is set")
        if self.decay_data is not None:
            need(self.schedule == "wsd", "schedule", "must be 'wsd' when decay_data is set")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TABLES = ("model", "ppo", "doremi")  # keys holding a table, settable per entry as "table.key"


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any) -> Any:
    """Fit a parsed value to the field's type (ints accepted for floats, "none" for None)."""
    default = FIELDS[key].default
    if isinstance(value, str) and value.lower() in ("none", "null") and key in (
            "tokenizer", "shards", "decay_data", "bfp", "init_from", "val_data", "ref_model",
            "domains", "domain_weights"):
        return None
    if isinstance(default, float) and _is_int(value):
        return float(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
    if _is_int(default) and not isinstance(default, bool) and not _is_int(value):
        raise ValueError(f"config key {key!r} must be an int, got {value!r}")
    if isinstance(default, float) and not _finite(value):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    return value


def apply(cfg: TrainConfig, values: dict, where: str = "config") -> TrainConfig:
    """A copy of ``cfg`` with ``values`` (a flat or nested dict) applied."""
    out = dataclasses.replace(cfg, model=dict(cfg.model), ppo=dict(cfg.ppo),
                              doremi=dict(cfg.doremi))
    for key, value in values.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key!r} must be a table of {key} settings")
            getattr(out, key).update(value)
            continue
        table, dot, sub = key.partition(".")
        if dot and table in TABLES:
            getattr(out, table)[sub] = value
            continue
        if key not in FIELDS:
            raise _unknown(key)
        setattr(out, key, _coerce(key, value))
    return out


def parse_set(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value); the value is read as TOML (numbers, booleans,
    strings, arrays), and taken as a plain string when it is not valid TOML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load_config(base: TrainConfig, config: str | None = None,
                named: dict[str, dict] | None = None, sets: list[str] = ()) -> TrainConfig:
    """Resolve ``base`` + a named config or TOML file + ``--set`` overrides, validated."""
    cfg = base
    if config is not None:
        if named and config in named:
            cfg = apply(cfg, named[config], f"named config {config!r}")
        else:
            path = Path(config)
            if not path.is_file():
                names = ", ".join(sorted(named or {}))
                raise ValueError(f"--config {config!r} is neither a file nor a named config "
                                 f"({names})")
            try:
                values = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
            cfg = apply(cfg, values, str(path))
    for item in sets:
        key, value = parse_set(item)
        cfg = apply(cfg, {key: value}, f"--set {item}")
    return cfg.validate()
