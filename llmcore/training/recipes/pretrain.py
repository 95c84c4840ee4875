"""Pretraining: next-token prediction on token shards.

The recipe = a config (:data:`NAMED_CONFIGS` and the :class:`TrainConfig` defaults),
a batch source (:class:`WindowBatches`: random windows of ``seq_len + 1`` tokens, drawn
from a generator seeded by (seed, step, micro-batch index), as nanoGPT samples them),
and :func:`step_fn` (cross-entropy of the next token) on the one loop.

With ``domain_weights`` set, the data is split into domains (``domains``; for the stdlib
corpus the rule of :mod:`llmcore.data.domains`) and batches come from
:class:`~llmcore.data.mixture.MixtureBatches` instead: each sequence from a domain drawn
by the weights (``natural``: the corpus' own token shares, ``uniform``, a JSON file such
as a DoReMi run's ``domain_weights.json``, or a table). Validation then reports every
domain's held-out loss and bits per byte (``val_bpb/<domain>``), their worst and mean,
and the whole split's figures (the domains' sums).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from llmcore.data.shards import TokenShards
from llmcore.evaluation.perplexity import evaluate_split, summarize
from llmcore.training.config import TrainConfig
from llmcore.training.losses import cross_entropy
from llmcore.training.optim import decay_start

# Named configs (``--config NAME``). "stdlib" is the committed CPU result: about 30 minutes
# on 2 cores (4.5M tokens; a ~2.4M-parameter model is near compute-optimal for that
# budget); "stdlib-gpu" the same data at the 124M shape for one GPU.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny": {"preset": "tiny", "vocab_size": 1024, "steps": 40, "batch_size": 8,
             "seq_len": 128, "lr": 3e-3, "min_lr": 3e-4, "warmup": 5, "eval_every": 20,
             "eval_tokens": 8192, "model": {"dim": 64, "n_layers": 2, "n_heads": 4,
                                            "n_kv_heads": 2, "ffn_dim": 176}},
    "stdlib": {"preset": "tiny", "vocab_size": 4096, "steps": 1100, "batch_size": 16,
               "seq_len": 256, "lr": 3e-3, "min_lr": 3e-4, "warmup": 50, "schedule": "wsd",
               "decay_frac": 0.2, "eval_every": 100, "eval_tokens": 65536, "save_every": 100,
               "model": {"dim": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2,
                         "ffn_dim": 512, "max_seq_len": 1024}},
    "stdlib-gpu": {"preset": "124M", "vocab_size": 8192, "steps": 5000, "batch_size": 32,
                   "seq_len": 1024, "lr": 1e-3, "min_lr": 1e-4, "warmup": 200,
                   "schedule": "wsd", "dtype": "bfloat16", "eval_every": 500,
                   "save_every": 1000, "model": {"tie_embeddings": True}},
}


def _seed_of(*parts: int) -> int:
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class WindowBatches:
    """Random windows of a shard split: ``batch(step, index)`` -> {"input_ids",
    "labels"} [batch_size, seq_len] int64. From step ``switch_step`` on, windows come
    from ``decay_shards`` (the anneal-on-the-best-data phase of a WSD run).
    ``counted = (P, T)``: the shards hold documents of P + T + 1 tokens (distillation
    data: a prompt, T generated tokens, EOS) and only the generated tokens are labels
    (the others are -100)."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int,
                 decay_shards: TokenShards | None = None, switch_step: int | None = None,
                 counted: tuple[int, int] | None = None):
        for s in (shards, decay_shards):
            if s is not None and s.num_tokens("train") < seq_len + 2:
                raise ValueError(f"{s.path}: the train split holds {s.num_tokens('train')} "
                                 f"tokens, fewer than seq_len + 2 = {seq_len + 2}")
        self.shards, self.decay_shards, self.switch_step = shards, decay_shards, switch_step
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.counted = counted

    def batch(self, step: int, index: int) -> dict:
        shards = self.shards
        if self.decay_shards is not None and step >= self.switch_step:
            shards = self.decay_shards
        tokens = shards.tokens("train")
        g = torch.Generator().manual_seed(_seed_of(self.seed, step, index))
        starts = torch.randint(0, tokens.numel() - self.seq_len - 1, (self.batch_size,),
                               generator=g).tolist()
        x = torch.stack([tokens[s:s + self.seq_len + 1].to(torch.int64) for s in starts])
        labels = x[:, 1:].contiguous()
        if self.counted is not None:
            p, t = self.counted
            pos = (torch.tensor(starts).unsqueeze(1) + torch.arange(1, self.seq_len + 1)) \
                % (p + t + 1)  # each label's place in its document
            labels[(pos < p) | (pos >= p + t)] = -100
        return {"input_ids": x[:, :-1].contiguous(), "labels": labels}


def counted_tokens(cfg: TrainConfig, shards: TokenShards) -> tuple[int, int] | None:
    """(prompt tokens, generated tokens) of distillation shards when ``cfg.loss_on`` is
    "generated" (None for "all"); ValueError for other shards."""
    if cfg.loss_on == "all":
        return None
    d = shards.header.get("distill")
    if not isinstance(d, dict):
        raise ValueError(f"config key 'loss_on' 'generated' needs distillation shards "
                         f"(`llmcore data distill`); {shards.path} are not")
    p, t = d["prompt_tokens"], d["new_tokens"]
    info = shards.header["splits"]["train"]
    if info["tokens"] != info["documents"] * (p + t + 1):
        raise ValueError(f"{shards.path}: the train split is not made of documents of "
                         f"{p} + {t} + 1 tokens")
    return p, t


def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy of the micro-batch."""
    logits = model(batch["input_ids"])  # [B, T, V]
    return cross_entropy(logits, batch["labels"]), {}


def build_model(cfg: TrainConfig, vocab_size: int):
    """The Transformer of ``cfg`` (preset + overrides), BFP-quantised for training when
    ``cfg.bfp`` is set, on the CPU."""
    from llmcore.models import Transformer, TransformerConfig
    from llmcore.nn import quantize_model

    overrides = dict(cfg.model)
    overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", max(cfg.seq_len, 256))
    try:
        mcfg = TransformerConfig.from_name(cfg.preset, **overrides)
    except TypeError as e:
        raise ValueError(f"config key 'model': {e}") from None
    if mcfg.max_seq_len < cfg.seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's max_seq_len "
                         f"{mcfg.max_seq_len}")
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg, backend=cfg.backend)
    init_weights(model)
    if cfg.init_from is not None:
        from llmcore.training.checkpoint import load_model_weights

        load_model_weights(model, cfg.init_from)
    if cfg.bfp is not None:
        # Every linear trains through BFP GEMMs; a head tied to the embedding stays full
        # precision (quantising it would untie it).
        exclude = ("lm_head",) if mcfg.tie_embeddings else ()
        quantize_model(model, cfg.bfp, act_format=cfg.bfp if cfg.bfp_act else None,
                       exclude=exclude, trainable=True)
    return model


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init: normal(0, 0.02) for linears and embeddings, the residual output
    projections (o_proj, down_proj) scaled by 1/sqrt(2 * n_layers)."""
    n_layers = model.config.n_layers
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight",
                                                             "down_proj.weight")) else std
        torch.nn.init.normal_(p, mean=0.0, std=s)
    for name, b in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.zeros_(b)


def flops_per_token(mcfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (non-embedding matmuls and the head) + 12 L d T
    (attention scores and values, forward and backward), the PaLM appendix estimate."""
    n = mcfg.num_params(embeddings=False) + mcfg.vocab_size * mcfg.dim
    return 6 * n + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * seq_len


def prepare_data(cfg: TrainConfig, progress: bool) -> tuple[Path, Path, Path | None]:
    """(tokenizer dir, shard dir, decay-phase shard dir or None) of ``cfg``: the ones it
    names, else made from its data and cached."""
    from llmcore.data.prepare import ensure_shards, ensure_tokenizer

    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else ensure_tokenizer(
        cfg.data, cfg.vocab_size, cfg.val_fraction, progress)
    shard_dir = Path(cfg.shards) if cfg.shards else ensure_shards(
        cfg.data, tok_dir, cfg.val_fraction, progress)
    if cfg.shards and cfg.tokenizer:  # both given: they must belong together
        from llmcore.data.shards import read_header
        from llmcore.tokenizer import tokenizer_hash

        if read_header(shard_dir).get("tokenizer_sha256") != tokenizer_hash(tok_dir):
            raise ValueError(f"config key 'shards' {str(shard_dir)!r} was tokenised with "
                             f"another tokenizer than config key 'tokenizer' {str(tok_dir)!r}")
    decay_dir = (ensure_shards(cfg.decay_data, tok_dir, cfg.val_fraction, progress)
                 if cfg.decay_data is not None else None)
    return tok_dir, shard_dir, decay_dir


def write_summary(run_dir: str | os.PathLike, shards,
                  xz_limit_bytes: int = 64 << 20, extra: dict | None = None) -> dict:
    """``RUN_DIR/summary.json``: the final validation figures, the ``xz -9e`` baseline on
    the same validation documents (skipped past ``xz_limit_bytes``), training tokens/s
    (median over steps), time spent in training steps, the config and the machine; for a
    mixture run (``shards`` a DomainShards) also each domain's final figures and ``xz``
    baseline under ``domains``. ``extra`` is merged in."""
    import json
    import platform
    import statistics

    from llmcore.data.corpus import iter_documents
    from llmcore.evaluation import xz_bits_per_byte

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in rows if r.get("split") != "val"]
    val = [r for r in rows if r.get("split") == "val"]
    per_step = cfg["batch_size"] * cfg["seq_len"] * cfg["grad_accum"]
    tps = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    out = {"config": cfg, "steps": train[-1]["step"] if train else 0,
           "tokens": train[-1]["tokens"] if train else 0,
           "final_train_loss": train[-1]["loss"] if train else None,
           "val": val[-1] if val else None, "val_curve": [
               {k: r[k] for k in ("step", "val_loss", "val_bpb")} for r in val],
           "tokens_per_s_median": statistics.median(tps) if tps else None,
           "train_time_s": sum(per_step / t for t in tps),
           "machine": {
               "python": platform.python_version(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    final = run_dir / "final" / "config.json"
    if final.is_file():
        from safetensors import safe_open

        hf = json.loads(final.read_text(encoding="utf-8"))
        with safe_open(str(run_dir / "final" / "model.safetensors"), "pt") as f:
            out["params"] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        out["model"] = {k: hf.get(k) for k in ("hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads",
                                                "intermediate_size", "vocab_size")}
    parts = shards.shards.values() if hasattr(shards, "shards") else [shards]
    if val and any(k.startswith("val_bpb/") for k in val[-1]):
        out["domains"] = {k[len("val_bpb/"):]: {"val_bpb": v,
                                                 "val_loss": val[-1][f"val_loss/{k[8:]}"]}
                          for k, v in val[-1].items() if k.startswith("val_bpb/")}
    if sum(p.header["splits"]["val"]["bytes"] for p in parts) > xz_limit_bytes:
        pass
    elif "domains" in out:  # a mixture run: the baseline per domain and over them all
        from llmcore.data.domains import iter_domain_documents

        texts: dict[str, list[str]] = {}
        for dom, doc in iter_domain_documents(cfg["data"], cfg["domains"] or "stdlib", "val",
                                              cfg["val_fraction"]):
            texts.setdefault(dom, []).append(doc.text)
        for dom, t in texts.items():
            if dom in out["domains"] and any(t):
                out["domains"][dom]["xz_9e_bpb"] = xz_bits_per_byte(t)["bpb"]
        out["xz_9e"] = xz_bits_per_byte(t for v in texts.values() for t in v)
    else:
        out["xz_9e"] = xz_bits_per_byte(
            d.text for d in iter_documents(cfg["data"], "val", cfg["val_fraction"]))
    out.update(extra or {})
    (run_dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def domain_spec(cfg: TrainConfig):
    """The domains of ``cfg``: its ``domains`` key, or the stdlib rule for stdlib data."""
    return cfg.domains if cfg.domains is not None else "stdlib"


def prepare_domains(cfg: TrainConfig, progress: bool):
    """(tokenizer dir, DomainShards) of a mixture run (both cached)."""
    from llmcore.data.domains import DomainShards, domain_data, ensure_domain_shards
    from llmcore.data.prepare import ensure_tokenizer

    spec = domain_spec(cfg)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else ensure_tokenizer(
        domain_data(spec, cfg.data), cfg.vocab_size, cfg.val_fraction, progress)
    return tok_dir, DomainShards(ensure_domain_shards(cfg.data, spec, tok_dir,
                                                      cfg.val_fraction))


def resolve_weights(spec, domains, arg: str = "domain_weights") -> dict[str, float]:
    """{domain: weight} of a mixture spec: ``"natural"`` (the train token shares),
    ``"uniform"``, a JSON weights file, or a table {domain: weight}."""
    from llmcore.data.mixture import check_weights, load_domain_weights

    names = domains.names
    if spec == "natural":
        w = domains.natural_weights()
    elif spec == "uniform":
        w = {n: 1.0 for n in names}
    elif isinstance(spec, dict):
        w = spec
    else:
        w = load_domain_weights(spec, arg)
    return dict(zip(names, check_weights(w, names, arg), strict=True))


def evaluate_domains(model: nn.Module, domains, seq_len: int, batch_size: int,
                     max_tokens: int | None = None, info=None) -> dict:
    """Held-out figures of every domain: ``val_loss/<d>``, ``val_bpb/<d>``, their worst
    (``val_bpb_worst``) and uniform mean (``val_bpb_mean``), and the whole split's
    ``val_loss`` / ``val_bpb`` / ``val_ppl`` / ``val_tokens`` (sums over the domains).
    ``max_tokens``: per domain (None: all). Domains without held-out tokens are skipped."""
    from llmcore.training import distributed as D

    out: dict = {}
    nll_all = count_all = bytes_all = 0.0
    bpbs = {}
    for n in domains.names:
        sh = domains.shards[n]
        if sh.num_tokens("val") < 2:
            continue
        kw = {} if info is None else {"rank": info.rank, "world_size": info.world_size}
        r = evaluate_split(model, sh, "val", seq_len, batch_size, max_tokens, **kw)
        nll, count = r["nll"], r["tokens"]
        if info is not None and info.enabled:
            nll, count = D.sum_across([nll, float(count)], info)
        r = summarize(nll, int(count), sh.bytes_per_token("val"))
        out[f"val_loss/{n}"], out[f"val_bpb/{n}"] = r["loss"], r["bpb"]
        bpbs[n] = r["bpb"]
        nll_all, count_all = nll_all + nll, count_all + count
        bytes_all += count * sh.bytes_per_token("val")
    if bpbs:
        out["val_bpb_worst"] = max(bpbs.values())
        out["val_bpb_mean"] = sum(bpbs.values()) / len(bpbs)
        whole = summarize(nll_all, int(count_all), bytes_all / max(count_all, 1))
        out.update({"val_loss": whole["loss"], "val_ppl": whole["ppl"],
                    "val_bpb": whole["bpb"], "val_tokens": whole["tokens"]})
    return out


def run(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
        stop_at: int | None = None) -> dict:
    """Prepare tokenizer and shards (cached), build the model, train into ``out``,
    evaluate the whole validation split at the end; returns the summary."""
    from llmcore.training import distributed as D
    from llmcore.training.loop import Trainer, check_run_dir, resume_compatible

    out = Path(out)
    info = D.setup()
    check_run_dir(out, resume)  # before any data work: fail fast
    if resume:
        resume_compatible(out, cfg)
    if cfg.domain_weights is not None:
        return _run_mixture(cfg, out, resume, stop_at, info)
    if info.is_main:  # rank 0 fills the cache; the others then find the same directories
        tok_dir, shard_dir, decay_dir = prepare_data(cfg, cfg.progress)
    D.barrier(info)
    if not info.is_main:
        tok_dir, shard_dir, decay_dir = prepare_data(cfg, False)
    shards = TokenShards(shard_dir)
    if shards.num_tokens("val") < 2:
        raise ValueError(f"the validation split of data {cfg.data!r} is empty "
                         f"(val_fraction={cfg.val_fraction}): raise val_fraction or add files")
    decay = TokenShards(decay_dir) if decay_dir is not None else None
    model = build_model(cfg, shards.vocab_size)
    batches = WindowBatches(shards, cfg.batch_size, cfg.seq_len, cfg.seed, decay,
                            decay_start(cfg.steps, cfg.warmup, cfg.decay_frac),
                            counted=counted_tokens(cfg, shards))

    def eval_fn(m, final: bool) -> dict:
        r = evaluate_split(m, shards, "val", cfg.seq_len, cfg.batch_size,
                           None if final else cfg.eval_tokens, progress=final and cfg.progress
                           and info.is_main, rank=info.rank, world_size=info.world_size)
        if info.enabled:
            nll, count = D.sum_across([r["nll"], float(r["tokens"])], info)
            r = summarize(nll, int(count), shards.bytes_per_token("val"))
        return {"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"],
                "val_tokens": r["tokens"]}

    trainer = Trainer(cfg, model, step_fn, batches, out, eval_fn=eval_fn,
                      sample_fn=make_sample_fn(cfg, tok_dir) if cfg.sample_tokens else None,
                      tokens_per_batch=cfg.batch_size * cfg.seq_len, tokenizer_dir=tok_dir,
                      flops_per_token=flops_per_token(model.config, cfg.seq_len), dist=info)
    result = trainer.fit(resume=resume, stop_at=stop_at)
    if info.is_main and trainer.step == cfg.steps:
        result["summary"] = write_summary(out, shards)
    result["shards"] = str(shard_dir)
    result["tokenizer"] = str(tok_dir)
    return result


def make_sample_fn(cfg: TrainConfig, tok_dir):
    """A sampled continuation of ``cfg.sample_prompt`` (logged at each evaluation)."""
    def sample_fn(m) -> str:
        from llmcore.generation import generate
        from llmcore.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
        ids = torch.tensor([tok.encode(cfg.sample_prompt, add_special_tokens=False) or
                            [tok.eos_token_id]], device=next(m.parameters()).device)
        room = m.config.max_seq_len - ids.shape[1]
        outp = generate(m, ids, max_new_tokens=max(0, min(cfg.sample_tokens, room)),
                        temperature=0.8, top_k=40, eos_token_id=tok.eos_token_id,
                        seed=cfg.seed)
        return tok.decode(outp[0].tolist())
    return sample_fn


def mixture_eval_fn(cfg: TrainConfig, domains, info):
    """eval_fn of a mixture run: every domain (``eval_tokens`` split over the domains for
    periodic evaluations; ``doremi.eval_tokens`` per domain, or all, at the end)."""
    def eval_fn(m, final: bool) -> dict:
        k = len(domains.names)
        per = (cfg.doremi.get("eval_tokens") or None) if final else \
            max(cfg.seq_len, cfg.eval_tokens // k)
        return evaluate_domains(m, domains, cfg.seq_len, cfg.batch_size, per, info)
    return eval_fn


def _run_mixture(cfg: TrainConfig, out: Path, resume: bool, stop_at: int | None, info,
                 step=None, stateful=None, sample_weights=None) -> dict:
    """Pretraining on a domain mixture (``cfg.domain_weights``, or ``sample_weights``
    given by a recipe that brings its own ``step`` function and ``stateful`` objects)."""
    from llmcore.data.mixture import MixtureBatches
    from llmcore.training import distributed as D
    from llmcore.training.loop import Trainer

    if cfg.decay_data is not None:
        raise ValueError("config key 'decay_data' cannot be combined with domain_weights "
                         "(anneal on a mixture by giving the decay data its own domain)")
    if info.is_main:
        tok_dir, domains = prepare_domains(cfg, cfg.progress)
    D.barrier(info)
    if not info.is_main:
        tok_dir, domains = prepare_domains(cfg, False)
    weights = sample_weights if sample_weights is not None else resolve_weights(
        cfg.domain_weights, domains)
    if not any(domains.shards[n].num_tokens("val") >= 2 for n in domains.names):
        raise ValueError(f"no domain of data {cfg.data!r} has held-out tokens "
                         f"(val_fraction={cfg.val_fraction})")
    model = build_model(cfg, domains.vocab_size)
    batches = MixtureBatches(domains, weights, cfg.batch_size, cfg.seq_len, cfg.seed)
    trainer = Trainer(cfg, model, step or mixture_step_fn, batches, out,
                      eval_fn=mixture_eval_fn(cfg, domains, info),
                      sample_fn=make_sample_fn(cfg, tok_dir) if cfg.sample_tokens else None,
                      tokens_per_batch=cfg.batch_size * cfg.seq_len, tokenizer_dir=tok_dir,
                      flops_per_token=flops_per_token(model.config, cfg.seq_len), dist=info,
                      stateful=stateful)
    result = trainer.fit(resume=resume, stop_at=stop_at)
    if info.is_main and trainer.step == cfg.steps:
        result["summary"] = write_summary(out, domains, extra={"mixture": weights})
    result["domains"] = str(domains.path)
    result["tokenizer"] = str(tok_dir)
    result["weights"] = weights
    return result


def mixture_step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """:func:`step_fn` on a mixture batch (the rows' domain ids are not an input)."""
    return step_fn(model, {k: v for k, v in batch.items() if k != "domain"})
