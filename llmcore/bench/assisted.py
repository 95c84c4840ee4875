"""`llmcore bench assisted`: assisted (speculative) generation against plain greedy
decoding of the same target (docs/benchmarks.md).

The target is the 124M preset with random weights (``bench generate``'s init), fp32, B=1,
a 64-token prompt, 64 new tokens. Every method's output is checked to be token for token
the plain greedy output. Drafters:
  layer-skip 2/12 mxint4   the target's first 2 blocks + its head, BFP mxint4 weights (mxint8
                           head): a small draft that needs no training
  self mxint8 / mxint4     the whole target with BFP weights and an MXINT8 draft cache
  prompt lookup            n-gram matches, on an input-grounded prompt: a document followed
                           by its first tokens again, so copying it is the right answer
Each row reports the acceptance rate, α (per-proposal acceptance), tokens per target call,
the mean draft length γ, the draft's cost per token c relative to the target's (measured by
decoding with the draft alone), and the speedup predicted by (1 − α^(γ+1)) / ((1 − α)(γc + 1))
next to the measured one: against plain greedy runs alternated with the row's own (A, B,
A, B, medians), so that a shared machine's drift falls on both. Random weights say nothing
about the acceptance a trained draft reaches on real text; the formula column shows what
the measured machinery turns a given α into. Quick: the tiny preset, 24 new tokens.

With ``target_dir`` and ``draft_dir`` (``--target DIR --draft DIR``: model directories as
``llmcore train`` saves them, sharing one tokenizer) the suite measures a trained pair
instead: prompts are windows of held-out text (the standard library's validation split,
which neither model trained on), the target runs in fp32 and quantised to mxint8, the
draft in fp32 and mxint8, each at every starting γ of ``draft_tokens``; the same columns.
"""

from __future__ import annotations

import functools
import json
import os
import time

import torch

from llmcore.bench.common import Row, add_ratios, progress_bar
from llmcore.generation import (
    AssistedStats,
    assisted_generate,
    generate,
    layer_skip_draft,
    predicted_speedup,
    self_draft,
)
from llmcore.models import Transformer, TransformerConfig

BASELINES = ["plain greedy"]


def target_model(preset: str, device) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_name(preset), device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
    return model


def _stat_cols(r: Row) -> str:
    """The printed columns a drafter row shares: acceptance .. measured speedup."""
    e = r.extra
    return (f"{e['acceptance_rate']:6.1%} {e['alpha']:6.2f} {e['tokens_per_call']:8.2f} "
            f"{e['mean_draft_length']:6.1f} {e['draft_cost_ratio']:5.2f} "
            f"{e['verify_cost_ratio']:5.2f} {e['predicted_speedup']:8.2f}x "
            f"{e['predicted_speedup_measured_verify']:6.2f}x {r.ratios['plain greedy']:8.2f}x")


def _verify_cost(target, cache, prompt: torch.Tensor, tokens: int, new: int,
                 device: torch.device) -> float:
    """One target call on ``tokens`` new tokens over the prompt's cache (rolled back after
    each), relative to the plain per-token cost (a greedy generation of ``new`` tokens from
    the prompt, prefill amortised), the two timed in turn (A, B, A, B; medians)."""
    plen = prompt.shape[1]
    cache.reset()
    target(prompt, cache=cache, prefill=True)
    x = prompt[:, :tokens]

    def call():
        target(x, cache=cache)
        cache.rollback(plen)
    call()
    (v_s, _), (plain_s, _) = _alternated_s([call, lambda: generate(target, prompt, new)], 5,
                                           device)
    return v_s / (plain_s / new)


def _verify_costs(target, prompt: torch.Tensor, plen: int, new: int, device: torch.device):
    """tokens -> :func:`_verify_cost` over a cache of its own, measured once per token
    count (the rows that share one reuse it)."""
    cache = target.new_cache(1, plen + 32)
    return functools.cache(
        lambda tokens: _verify_cost(target, cache, prompt, tokens, new, device))


def _draft_cost(draft, target, prompt: torch.Tensor, new: int, runs: int, device,
                draft_kv: str = "native") -> float:
    """c: the draft's per-token cost over the target's, both greedy generations of ``new``
    tokens from ``prompt`` timed in turn (A, B, A, B; medians)."""
    (d_s, _), (t_s, _) = _alternated_s(
        [lambda: generate(draft, prompt, new, cache_storage=draft_kv),
         lambda: generate(target, prompt, new)], runs, device)
    return d_s / t_s


def _alternated_s(fns, runs: int, device: torch.device) -> list[tuple[float, object]]:
    """(median seconds, last output) of each of ``fns``, run in turn ``runs`` times (A, B,
    A, B, ...), so that a shared machine's drift falls on all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - t0)
    return [(sorted(t)[len(t) // 2], o) for t, o in zip(times, outs, strict=True)]


def _median_s(fn, runs: int, device: torch.device) -> tuple[float, object]:
    """(median seconds, last output) of ``runs`` calls of ``fn``."""
    return _alternated_s([fn], runs, device)[0]


def _set_alternated_ratios(rows: list[Row]) -> None:
    """After add_ratios: an assisted row's speed-up over plain greedy from the plain runs
    alternated with its own (extra["plain_s_alternated"]), not the case's plain row timed
    apart from it."""
    for r in rows:
        if "plain_s_alternated" in r.extra and r.ms > 0:
            r.ratios["plain greedy"] = r.extra["plain_s_alternated"] * 1e3 / r.ms


def plan(quick: bool) -> tuple[str, int, int, int]:
    """(preset, prompt tokens, new tokens, timed runs per method)."""
    return ("tiny", 32, 24, 1) if quick else ("124M", 64, 64, 2)


def make_prompts(vocab_size: int, plen: int, device) -> dict[str, torch.Tensor]:
    """{"free text": random tokens, "copy task": a document followed by its first 16
    tokens again ("repeat the document")}, each [1, plen]."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab_size, (1, plen), generator=g).to(device)
    doc = torch.randint(0, vocab_size, (1, plen - 16), generator=g).to(device)
    return {"free text": prompt, "copy task": torch.cat([doc, doc[:, :16]], dim=1)}


def drafts(target: Transformer) -> list[tuple[str, object, str, str]]:
    """[(name, make the draft, prompt case, draft KV cache storage)]."""
    cfg = target.config
    skip = max(1, cfg.n_layers // 6)
    return [
        (f"layer-skip {skip}/{cfg.n_layers} mxint4", lambda: layer_skip_draft(target, skip, "mxint4"),
         "free text", "mxint8"),
        ("self mxint8", lambda: self_draft(target, "mxint8"), "free text", "mxint8"),
        ("self mxint4", lambda: self_draft(target, "mxint4"), "free text", "mxint8"),
        ("prompt lookup", lambda: "prompt_lookup", "copy task", "native"),
    ]


@torch.inference_mode()
def run(device: torch.device, quick: bool = False, progress_factory=None,
        target_dir: str | None = None, draft_dir: str | None = None,
        draft_tokens: list[int] | None = None, schedule: str = "heuristic") -> dict:
    if target_dir is not None or draft_dir is not None:
        return run_trained(device, target_dir, draft_dir, draft_tokens, quick, progress_factory,
                           schedule)
    preset, plen, new, runs = plan(quick)
    target = target_model(preset, device)
    prompts = make_prompts(target.config.vocab_size, plen, device)
    prompt = prompts["free text"]
    todo = drafts(target)
    pbar = progress_bar(progress_factory, len(prompts) + 2 * len(todo), "bench assisted")
    tick = pbar.update

    generate(target, prompt, 4)  # warm up
    plain = {}  # case -> (seconds, tokens)
    rows = []
    for case, p in prompts.items():
        plain[case] = _median_s(lambda p=p: generate(target, p, new), runs, device)
        rows.append(Row("assisted", f"B=1 {preset} {case}", "plain greedy", plain[case][0] * 1e3,
                        metric=new / plain[case][0], unit="tok/s",
                        extra={"preset": preset, "new": new}))
        tick()
    verify_cost = _verify_costs(target, prompt, plen, new, device)

    for name, make, case, draft_kv in todo:
        draft = make()
        if isinstance(draft, str):
            c = 0.0
        else:
            c = _draft_cost(draft, target, prompt, new, runs, device, draft_kv)
        tick()
        p = prompts[case]
        (s, (out, st)), (plain_s, _) = _alternated_s(
            [lambda draft=draft, p=p, draft_kv=draft_kv: assisted_generate(
                target, draft, p, new, draft_cache_storage=draft_kv),
             lambda p=p: generate(target, p, new)], runs, device)
        tick()
        if not torch.equal(out, plain[case][1]):
            raise RuntimeError(f"assisted generation with {name} differs from plain greedy")
        gamma = st.mean_draft_length
        pred = predicted_speedup(st.alpha, gamma, c)
        v = verify_cost(max(1, round(gamma)) + 1)
        pred_v = pred * (gamma * c + 1) / (gamma * c + v)  # with the measured verify cost
        rows.append(Row("assisted", f"B=1 {preset} {case}", name, s * 1e3, metric=new / s,
                        unit="tok/s",
                        extra={**st.as_dict(), "draft_cost_ratio": c, "predicted_speedup": pred,
                               "verify_cost_ratio": v, "predicted_speedup_measured_verify": pred_v,
                               "preset": preset, "new": new, "draft_kv_cache": draft_kv,
                               "plain_s_alternated": plain_s}))
        del draft
    pbar.close()
    add_ratios(rows, BASELINES)
    _set_alternated_ratios(rows)
    lines = ["c: draft cost per token / target's; v: one verification call / one target step (each "
             "timed in turn with the target's plain greedy decoding)",
             "predicted: (1 - a^(g+1)) / ((1 - a)(g c + 1)); with v: the same with v for the 1",
             "method                  case        accept  alpha  tok/call  gamma   c     v    "
             "predicted  with v  measured"]
    for r in rows:
        if r.method == "plain greedy":
            continue
        lines.append(f"{r.method:23s} {r.case.split()[-2] + ' ' + r.case.split()[-1]:11s} "
                     + _stat_cols(r))
    return {"rows": rows, "baselines": BASELINES,
            "extra": {"prompt_tokens": plen, "new_tokens": new, "preset": preset},
            "text": "\n".join(lines)}


# -- a trained target and draft ------------------------------------------------------------
def plan_trained(quick: bool) -> tuple[int, int, int, int]:
    """(prompts, prompt tokens, new tokens, timed runs per method)."""
    return (2, 32, 24, 1) if quick else (4, 64, 96, 3)


def _model_dir(flag: str, path) -> str:
    if path is None:
        raise ValueError(f"{flag} is required with --target/--draft (both or neither)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{flag} {path}: no config.json in it (a model directory as "
                                "`llmcore train` saves it: RUN/final)")
    return str(path)


def load_pair(target_dir, draft_dir, device) -> tuple[Transformer, Transformer, object]:
    """(target, draft, tokenizer) from two model directories; FileNotFoundError for a
    missing one, ValueError when the draft does not share the target's tokenizer."""
    from llmcore.tokenizer import load_tokenizer

    target_dir, draft_dir = _model_dir("--target", target_dir), _model_dir("--draft", draft_dir)
    if not os.path.isfile(os.path.join(target_dir, "tokenizer.json")):
        raise FileNotFoundError(f"--target {target_dir}: no tokenizer.json in it (the prompts "
                                "are tokenised with the target's tokenizer)")
    tok = load_tokenizer(target_dir)
    target = Transformer.from_pretrained(target_dir, device=device).eval()
    draft = Transformer.from_pretrained(draft_dir, device=device).eval()
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"--draft {draft_dir} has vocab_size {dv}, --target {target_dir} "
                         f"{tv}: the draft must be trained with the target's tokenizer")
    if os.path.isfile(os.path.join(draft_dir, "tokenizer.json")):
        if load_tokenizer(draft_dir).tokenizer.get_vocab() != tok.tokenizer.get_vocab():
            raise ValueError(f"--draft {draft_dir} has a tokenizer other than --target "
                             f"{target_dir}'s: the draft must be trained with the target's "
                             "tokenizer (`llmcore train ... --set tokenizer=TARGET_DIR`)")
    return target, draft, tok


def _run_info(model_dir: str) -> dict:
    """The training config and summary of the run a ``final/`` (or checkpoint) directory
    belongs to, where they lie beside it ({} when they do not)."""
    for up in ("..", os.path.join("..", "..")):  # RUN/final, RUN/checkpoints/step_N
        run = os.path.join(model_dir, up)
        f = os.path.join(run, "config.json")
        if os.path.isfile(f):
            cfg = json.loads(open(f, encoding="utf-8").read())
            if "recipe" in cfg:
                info = {"run_dir": os.path.normpath(run), "config": cfg}
                summary = os.path.join(run, "summary.json")
                if os.path.isfile(summary):
                    summ = json.loads(open(summary, encoding="utf-8").read())
                    info["summary"] = {k: v for k, v in summ.items() if k != "config"}
                return info
    return {}


def heldout_prompts(tok, n: int, plen: int, val_fraction: float) -> list[tuple[str, list[int]]]:
    """``n`` prompts of ``plen`` tokens: the window ending mid-document of ``n`` documents
    spread over the standard library's validation split (files of at least 2 ``plen``
    tokens; only the chosen ones are tokenised)."""
    from llmcore.data.corpus import stdlib_documents

    docs = [d for d in stdlib_documents("val", val_fraction) if len(d.text) >= 16 * plen]
    out = []
    for d in [docs[i * len(docs) // n] for i in range(min(n, len(docs)))] + docs:
        if any(d.source == src for src, _ in out):
            continue
        ids = tok.encode(d.text, add_special_tokens=False)
        if len(ids) >= 2 * plen:
            out.append((d.source, ids[len(ids) // 2 - plen:len(ids) // 2]))
        if len(out) == n:
            return out
    raise ValueError(f"the stdlib validation split (val_fraction {val_fraction}) has fewer "
                     f"than {n} documents of >= {2 * plen} tokens")


def merge_stats(stats) -> AssistedStats:
    """The counts of several ``assisted_generate`` calls added up."""
    m = AssistedStats()
    for s in stats:
        for f in ("drafted", "accepted", "rejected", "target_tokens", "new_tokens",
                  "row_steps", "target_calls", "draft_calls", "elapsed_s"):
            setattr(m, f, getattr(m, f) + getattr(s, f))
        m.accepted_hist = [a + b for a, b in zip(m.accepted_hist, s.accepted_hist, strict=True)]
        m.draft_lengths += s.draft_lengths
    return m


@torch.inference_mode()
def run_trained(device: torch.device, target_dir, draft_dir, draft_tokens=None,
                quick: bool = False, progress_factory=None, schedule: str = "heuristic"
                ) -> dict:
    """The suite on a trained target and draft (module docstring): per target precision
    (fp32, mxint8) the plain greedy row and one row per (draft precision, γ): the starting
    γ of the heuristic schedule, or every step's with ``schedule="constant"``."""
    n_prompts, plen, new, runs = plan_trained(quick)
    gammas = list(draft_tokens or [5])
    target32, draft32, tok = load_pair(target_dir, draft_dir, device)
    runs_info = {"target": _run_info(target_dir), "draft": _run_info(draft_dir)}
    tcfg = runs_info["target"].get("config", {})
    val_fraction = tcfg.get("val_fraction", 0.05) if tcfg.get("data", "stdlib") == "stdlib" \
        else 0.05
    prompts = [(src, torch.tensor([ids], device=device))
               for src, ids in heldout_prompts(tok, n_prompts, plen, val_fraction)]
    targets = {"fp32": target32, "mxint8": target32.quantized("mxint8")}
    drafts_ = {"fp32": draft32, "mxint8": draft32.quantized("mxint8")}
    per_target = 1 + 2 * len(drafts_) * len(gammas)
    pbar = progress_bar(progress_factory, len(targets) * per_target, "bench assisted")
    rows = []
    for tname, target in targets.items():
        case = f"B=1 trained target {tname}"
        common = {"target_precision": tname, "prompts": len(prompts), "new": new}
        generate(target, prompts[0][1], 4)  # warm up
        plain_s, plain_out = 0.0, []
        for _, p in prompts:
            s, out = _median_s(lambda p=p, target=target: generate(target, p, new), runs, device)
            plain_s, plain_out = plain_s + s, plain_out + [out]
        total = new * len(prompts)
        rows.append(Row("assisted", case, "plain greedy", plain_s * 1e3, metric=total / plain_s,
                        unit="tok/s", extra=dict(common)))
        pbar.update()
        p0 = prompts[0][1]
        verify_cost = _verify_costs(target, p0, plen, new, device)

        for dname, draft in drafts_.items():
            generate(draft, p0, 4)
            c = _draft_cost(draft, target, p0, new, runs, device)
            pbar.update()
            for g in gammas:
                name = f"trained draft {dname} g={g}"
                secs, plain_alt, stats = 0.0, 0.0, []
                for (src, p), want in zip(prompts, plain_out, strict=True):
                    (s, (out, st)), (ps, _) = _alternated_s(
                        [lambda p=p, draft=draft, g=g, target=target: assisted_generate(
                            target, draft, p, new, num_draft_tokens=g, schedule=schedule),
                         lambda p=p, target=target: generate(target, p, new)], runs, device)
                    if not torch.equal(out, want):
                        raise RuntimeError(f"assisted generation with the {name} differs from "
                                           f"plain greedy (target {tname}, prompt from {src})")
                    secs, plain_alt, stats = secs + s, plain_alt + ps, stats + [st]
                st = merge_stats(stats)
                gamma = st.mean_draft_length
                pred = predicted_speedup(st.alpha, gamma, c)
                v = verify_cost(max(1, round(gamma)) + 1)
                pred_v = pred * (gamma * c + 1) / (gamma * c + v)
                rows.append(Row("assisted", case, name, secs * 1e3, metric=total / secs,
                                unit="tok/s",
                                extra={**st.as_dict(), "draft_cost_ratio": c,
                                       "predicted_speedup": pred, "verify_cost_ratio": v,
                                       "predicted_speedup_measured_verify": pred_v,
                                       "draft_precision": dname, "num_draft_tokens": g,
                                       "schedule": schedule, "plain_s_alternated": plain_alt,
                                       **common}))
                pbar.update()
    pbar.close()
    add_ratios(rows, BASELINES)
    _set_alternated_ratios(rows)
    lines = [f"trained pair: greedy, prompts = held-out stdlib text; outputs equal plain greedy; "
             f"{schedule} schedule",
             "c: draft cost per token / target's; v: one verification call / one target step (each "
             "timed in turn with the target's plain greedy decoding)",
             "target  method                     accept  alpha  tok/call  gamma   c     v    "
             "predicted  with v  measured"]
    for r in rows:
        if r.method == "plain greedy":
            continue
        e = r.extra
        lines.append(f"{e['target_precision']:7s} {r.method:26s} " + _stat_cols(r))
    params = {k: sum(p.numel() for p in m.parameters())
              for k, m in (("target", target32), ("draft", draft32))}
    return {"rows": rows, "baselines": BASELINES,
            "extra": {"target_dir": str(target_dir), "draft_dir": str(draft_dir),
                      "params": params, "model_configs": {"target": target32.config.to_dict(),
                                                          "draft": draft32.config.to_dict()},
                      "training": runs_info, "prompt_tokens": plen, "new_tokens": new,
                      "prompts": [src for src, _ in prompts], "val_fraction": val_fraction,
                      "draft_tokens": gammas, "schedule": schedule},
            "text": "\n".join(lines)}
