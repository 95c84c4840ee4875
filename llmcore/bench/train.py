"""``llmcore bench train``: training tokens/s of whole models, and what BFP does to the loss.

For each model shape, four methods train on the same real data (the standard-library
corpus, tokenised with the cached stdlib BPE): plain PyTorch (``backend="torch"``, fp32),
llmcore fp32, llmcore under bf16 autocast, and llmcore with MXINT8 in every linear (W8A8
integer GEMMs forward and backward, fp32 master weights — the MX training recipe). Each
method starts from the same weights and sees the same batches. The methods run
interleaved (rounds of a few steps each, A B C D A B C D ...) and the median step time
counts, so a noisy shared machine hurts every method alike. The loss after the last
step is reported per method; a separate, longer run of the smallest shape compares the
validation loss of MXINT8 and fp32 training at equal steps (the target: within 2%).

Shapes: ``tiny`` (dim 128, 4 layers) and ``30M`` (dim 512, 8 layers) at seq 256; the full
run adds the 124M shape (vocab 4096 instead of GPT-2's 50257: the corpus tokenizer's).

Post-training, on the tiny shape and the stdlib instruction and preference sets: an SFT
step over the same examples packed into one row (``attention_varlen``, no padding) and
padded to the longest (tokens/s counts the real tokens, so the ratio is the time saved),
and a DPO step with cached reference log-probs against one that runs the reference model
next to the policy (pairs/s; the one-off cost of the cache is reported per pair).
"""

from __future__ import annotations

import statistics
import time

import torch

from llmcore.bench.common import Row, add_ratios, progress_bar, sync

BASELINES = ["torch fp32", "llmcore bf16 autocast", "sft padded", "dpo live reference"]
METHODS = [  # name, backend, autocast dtype, bfp format
    ("torch fp32", "torch", "float32", None),
    ("llmcore fp32", "llmcore", "float32", None),
    ("llmcore bf16 autocast", "llmcore", "bfloat16", None),
    ("llmcore mxint8", "llmcore", "float32", "mxint8"),
]
VOCAB = 4096  # the stdlib config's tokenizer (shared cache)
PARITY_STEPS = {True: 40, False: 200}  # quick -> steps of the MXINT8-vs-fp32 loss run
SHAPES = {
    "tiny": {"preset": "tiny", "model": {"dim": 128, "n_layers": 4, "n_heads": 4,
                                         "n_kv_heads": 2, "ffn_dim": 352}},
    "30M": {"preset": "tiny", "model": {"dim": 512, "n_layers": 8, "n_heads": 8,
                                        "n_kv_heads": 8, "ffn_dim": 1376}},
    "124M": {"preset": "124M", "model": {}},
}


def plan(device: torch.device, quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(shape, batch, seq_len, rounds, steps per round) per case."""
    if device.type == "cuda":
        return [("124M", 16, 1024, 3, 5)] if quick else [("124M", 16, 1024, 5, 10)]
    cases = [("tiny", 8, 256, 3, 2), ("30M", 4, 256, 3, 1)]
    return cases if quick else [("tiny", 8, 256, 5, 4), ("30M", 4, 256, 5, 2),
                                ("124M", 4, 256, 3, 1)]


def data(progress: bool = True):
    """The stdlib shards at the bench vocabulary (made once, then cached)."""
    from llmcore.data.prepare import ensure_shards, ensure_tokenizer
    from llmcore.data.shards import TokenShards

    tok = ensure_tokenizer("stdlib", VOCAB, progress=progress)
    return TokenShards(ensure_shards("stdlib", tok, progress=progress))


def config(shape: str, method: tuple, batch: int, seq_len: int, steps: int, **over):
    from llmcore.training.config import TrainConfig, apply

    _, backend, dtype, bfp = method
    model = {**SHAPES[shape]["model"], "max_seq_len": max(seq_len, 256)}
    values = {"preset": SHAPES[shape]["preset"], "model": model, "backend": backend,
              "dtype": dtype, "bfp": bfp, "batch_size": batch, "seq_len": seq_len,
              "steps": steps, "warmup": min(10, steps), "lr": 1e-3, "min_lr": 1e-4,
              "vocab_size": VOCAB, **over}
    return apply(TrainConfig(), values).validate()


class _Run:
    """One method's model, optimizer and step counter, advanced a few steps at a time."""

    def __init__(self, cfg, shards, device):
        from llmcore.training.optim import make_optimizer
        from llmcore.training.recipes.pretrain import WindowBatches, build_model

        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, shards.vocab_size).to(device).train()
        self.opt = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = WindowBatches(shards, cfg.batch_size, cfg.seq_len, cfg.seed)
        self.step, self.times, self.loss = 0, [], float("nan")

    def advance(self, n: int, timed: bool = True) -> None:
        from llmcore.training.loop import autocast_for, train_step
        from llmcore.training.optim import lr_at
        from llmcore.training.recipes.pretrain import step_fn

        c = self.cfg
        for _ in range(n):
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, steps=c.steps, lr=c.lr, min_lr=c.min_lr,
                                warmup=c.warmup, schedule=c.schedule)
            batch = self.batches.batch(self.step, 0)
            t0 = time.perf_counter()
            sums, _ = train_step(self.model, self.opt, self.params, step_fn, [batch],
                                 clip=c.clip, device=self.device,
                                 autocast=lambda: autocast_for(c.dtype, self.device))
            sync(self.device)
            if timed:
                self.times.append(time.perf_counter() - t0)
            self.loss = sums["loss"]
            self.step += 1


def run_case(device, shards, shape, batch, seq_len, rounds, per_round, progress=None):
    from llmcore.training.loop import mfu
    from llmcore.training.recipes.pretrain import flops_per_token

    steps = 1 + rounds * per_round
    runs = [(m, _Run(config(shape, m, batch, seq_len, steps), shards, device)) for m in METHODS]
    for _, r in runs:  # warm-up step (allocations, first-call dispatch), not timed
        r.advance(1, timed=False)
    for _ in range(rounds):
        for _, r in runs:
            r.advance(per_round)
            if progress is not None:
                progress.update(per_round)
    rows = []
    tokens = batch * seq_len
    for (name, backend, dtype, bfp), r in runs:
        ms = statistics.median(r.times) * 1e3
        extra = {"shape": shape, "batch": batch, "seq_len": seq_len, "steps": r.step,
                 "timed_steps": len(r.times), "loss_last": r.loss, "backend": backend,
                 "autocast": dtype, "bfp": bfp,
                 "params": sum(p.numel() for p in r.model.parameters())}
        if device.type == "cuda":
            extra["mfu"] = mfu(tokens / ms * 1e3 * flops_per_token(r.model.config, seq_len),
                                device)
        rows.append(Row("train", f"{shape} B={batch} T={seq_len}", name, ms,
                        metric=tokens / ms * 1e3, unit="tok/s", extra=extra))
        del r.model, r.opt
    return rows


def loss_parity(device, shards, steps: int, progress=None) -> dict:
    """Validation loss of fp32 and MXINT8 training of the tiny shape after ``steps``."""
    from llmcore.evaluation import evaluate_split

    out = {}
    for method in (METHODS[1], METHODS[3]):
        r = _Run(config("tiny", method, 8, 256, steps), shards, device)
        for _ in range(steps):
            r.advance(1, timed=False)
            if progress is not None:
                progress.update(1)
        r.model.eval()
        ev = evaluate_split(r.model, shards, "val", 256, 8, max_tokens=32768)
        out[method[0]] = {"train_loss_last": r.loss, "val_loss": ev["loss"], "val_bpb": ev["bpb"]}
    a, b = out["llmcore fp32"]["val_loss"], out["llmcore mxint8"]["val_loss"]
    out["relative_gap"] = (b - a) / a
    out["steps"] = steps
    return out


def post_plan(quick: bool) -> tuple[int, int, int, int]:
    """(SFT examples per step, DPO pairs per step, rounds, steps per round)."""
    return (16, 4, 3, 2) if quick else (16, 4, 5, 4)


POST_METHODS = ("sft padded", "sft packed", "dpo live reference", "dpo cached reference")


def posttrain_cases(device, examples: list, pairs: list, per_step: int, pairs_per_step: int,
                    rounds: int, per_round: int, progress=None, methods=POST_METHODS) -> list:
    """SFT packed vs padded and DPO cached vs live reference, interleaved (tiny shape);
    ``methods`` a subset of :data:`POST_METHODS`."""
    from llmcore.training.batching import packed_batch, padded_batch, pair_batch
    from llmcore.training.loop import train_step
    from llmcore.training.optim import make_optimizer
    from llmcore.training.recipes import dpo, sft
    from llmcore.training.recipes.pretrain import build_model
    from llmcore.training.reference import reference_logprobs

    cfg = config("tiny", METHODS[1], 1, 512, 100)

    def fresh():
        m = build_model(cfg, VOCAB).to(device).train()
        return m, make_optimizer(m, 1e-4, 0.0, (0.9, 0.95)), [p for p in m.parameters()]

    steps = 1 + rounds * per_round
    need, need_pairs = steps * per_step, steps * pairs_per_step
    examples, pairs = examples[:need], pairs[:need_pairs]
    if len(examples) < need or len(pairs) < need_pairs:
        raise ValueError(f"need {need} examples and {need_pairs} pairs")
    ref_model = build_model(cfg, VOCAB).to(device).eval().requires_grad_(False)
    t0 = time.perf_counter()
    ref = reference_logprobs(ref_model, pairs, pairs_per_step)
    ref_s_per_pair = (time.perf_counter() - t0) / len(pairs)
    make = {"sft padded": lambda i: padded_batch(examples[i * per_step:(i + 1) * per_step], 2),
               "sft packed": lambda i: packed_batch(examples[i * per_step:(i + 1) * per_step]),
               "dpo live reference": lambda i: pair_batch(
                   pairs, range(i * pairs_per_step, (i + 1) * pairs_per_step)),
               "dpo cached reference": lambda i: dpo.WithReference(None, ref).attach(pair_batch(
                   pairs, range(i * pairs_per_step, (i + 1) * pairs_per_step)))}
    step_fns = {"sft padded": sft.step_fn, "sft packed": sft.step_fn,
                "dpo live reference": dpo.make_step_fn(cfg, ref_model),
                "dpo cached reference": dpo.make_step_fn(cfg)}
    unknown = set(methods) - set(make)
    if unknown:
        raise ValueError(f"unknown post-training bench methods {sorted(unknown)}")
    methods = {name: make[name] for name in methods}
    state = {name: (*fresh(), []) for name in methods}
    done = dict.fromkeys(methods, 0)

    def advance(name, n, timed=True):
        model, opt, params, times = state[name]
        for _ in range(n):
            batch = methods[name](done[name])
            t0 = time.perf_counter()
            train_step(model, opt, params, step_fns[name], [batch], clip=1.0, device=device)
            sync(device)
            if timed:
                times.append(time.perf_counter() - t0)
            done[name] += 1

    for name in methods:  # warm-up step, not timed
        advance(name, 1, timed=False)
    for _ in range(rounds):
        for name in methods:
            advance(name, per_round)
            if progress is not None:
                progress.update(per_round)
    rows = []
    for name in methods:
        ms = statistics.median(state[name][3]) * 1e3
        if name.startswith("sft"):
            tokens = sum(len(e) for e in examples[:need]) / steps
            rows.append(Row("train", f"sft {per_step} examples/step", name, ms,
                            metric=tokens / ms * 1e3, unit="tok/s",
                            extra={"real_tokens_per_step": tokens, "shape": "tiny"}))
        else:
            rows.append(Row("train", f"dpo {pairs_per_step} pairs/step", name, ms,
                            metric=pairs_per_step / ms * 1e3, unit="pairs/s",
                            extra={"shape": "tiny", "reference_cache_s_per_pair":
                                   ref_s_per_pair if "cached" in name else None}))
    return rows


def posttrain_data(progress: bool = True) -> tuple[list, list]:
    """Encoded stdlib SFT examples and preference pairs (seq 512, the bench tokenizer)."""
    from llmcore.data.examples import Renderer, encode_rows, read_rows
    from llmcore.data.prepare import ensure_stdlib_task, ensure_tokenizer
    from llmcore.tokenizer import load_tokenizer

    r = Renderer(load_tokenizer(ensure_tokenizer("stdlib", VOCAB, progress=progress)), 512)
    out = []
    for kind in ("sft", "preference"):
        rows = read_rows(ensure_stdlib_task(kind, progress=progress) / "train.jsonl", kind)
        out.append(encode_rows(rows[:400], r, kind, skip_bad_rows=True))
    return out[0], out[1]


def run(device: torch.device, quick: bool = False, progress_factory=None) -> dict:
    shards = data(progress=progress_factory is not None)
    todo = plan(device, quick)
    parity_steps = PARITY_STEPS[quick]
    per_step, pairs_step, post_rounds, post_per = post_plan(quick)
    total = (sum(len(METHODS) * r * k for _, _, _, r, k in todo) + 2 * parity_steps
             + 4 * post_rounds * post_per)
    pbar = progress_bar(progress_factory, total, "bench train")
    rows: list = []
    for case in todo:
        rows += run_case(device, shards, *case, progress=pbar)
    parity = loss_parity(device, shards, parity_steps, pbar)
    examples, pairs = posttrain_data(progress_factory is not None)
    rows += posttrain_cases(device, examples, pairs, per_step, pairs_step, post_rounds,
                            post_per, pbar)
    pbar.close()
    add_ratios(rows, BASELINES)
    lines = ["Loss after the timed steps (same data, same init):"]
    lines += [f"  {r.case:22s} {r.method:24s} {r.extra['loss_last']:.4f}" for r in rows
              if "loss_last" in r.extra]
    cache = next(r.extra["reference_cache_s_per_pair"] for r in rows
                 if r.method == "dpo cached reference")
    lines += ["", f"Reference cache: computed once before training, {cache * 1e3:.1f} ms per "
              "pair (the live reference pays that on every step)."]
    lines += ["", f"MXINT8 vs fp32 training, tiny shape, {parity_steps} steps, val loss: "
              f"{parity['llmcore fp32']['val_loss']:.4f} vs "
              f"{parity['llmcore mxint8']['val_loss']:.4f} "
              f"({parity['relative_gap']:+.2%}; target within 2%)"]
    return {"rows": rows, "baselines": BASELINES,
            "extra": {"loss_parity": parity, "vocab_size": VOCAB, "interleaved": True},
            "text": "\n".join(lines)}
