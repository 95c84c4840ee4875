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
next to the measured one. Random weights say nothing about the acceptance a trained draft
reaches on real text; the formula column shows what the measured machinery turns a given α
into. Quick: the tiny preset, 24 new tokens.
"""

from __future__ import annotations

import time

import torch

from llmcore.bench.common import Row, add_ratios, progress_bar
from llmcore.generation import (
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


def _median_s(fn, runs: int, device: torch.device) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


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
def run(device: torch.device, quick: bool = False, progress_factory=None) -> dict:
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
    t_step = plain["free text"][0] / new  # target seconds per token (prefill amortised)
    cache = target.new_cache(1, plen + 32)

    def verify_cost(tokens: int) -> float:
        """One target call on ``tokens`` new tokens over the prompt's cache, relative to
        t_step (the plain per-token cost)."""
        cache.reset()
        target(prompt, cache=cache, prefill=True)
        x = prompt[:, :tokens]

        def call():
            target(x, cache=cache)
            cache.rollback(plen)
        call()
        return _median_s(call, 5, device)[0] / t_step

    for name, make, case, draft_kv in todo:
        draft = make()
        if isinstance(draft, str):
            c = 0.0
        else:
            d_s, _ = _median_s(lambda draft=draft, draft_kv=draft_kv: generate(
                draft, prompt, new, cache_storage=draft_kv), runs, device)
            c = d_s / new / t_step
        tick()
        p = prompts[case]
        s, (out, st) = _median_s(lambda draft=draft, p=p, draft_kv=draft_kv: assisted_generate(
            target, draft, p, new, draft_cache_storage=draft_kv), runs, device)
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
                               "preset": preset, "new": new, "draft_kv_cache": draft_kv}))
        del draft
    pbar.close()
    add_ratios(rows, BASELINES)
    lines = ["c: draft cost per token / target's; v: one verification call / one target step",
             "predicted: (1 - a^(g+1)) / ((1 - a)(g c + 1)); with v: the same with v for the 1",
             "method                  case        accept  alpha  tok/call  gamma   c     v    "
             "predicted  with v  measured"]
    for r in rows:
        if r.method == "plain greedy":
            continue
        e = r.extra
        lines.append(f"{r.method:23s} {r.case.split()[-2] + ' ' + r.case.split()[-1]:11s} "
                     f"{e['acceptance_rate']:6.1%} {e['alpha']:6.2f} {e['tokens_per_call']:8.2f} "
                     f"{e['mean_draft_length']:6.1f} {e['draft_cost_ratio']:5.2f} "
                     f"{e['verify_cost_ratio']:5.2f} {e['predicted_speedup']:8.2f}x "
                     f"{e['predicted_speedup_measured_verify']:6.2f}x {r.ratios['plain greedy']:8.2f}x")
    return {"rows": rows, "baselines": BASELINES,
            "extra": {"prompt_tokens": plen, "new_tokens": new, "preset": preset},
            "text": "\n".join(lines)}
