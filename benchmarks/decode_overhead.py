"""Per-token cost of a CPU decode step of a 110M Llama (batch 1, mxint8 weights, int8
activations) and how much of it is outside the GEMV kernels.

    python benchmarks/decode_overhead.py --threads 1 2 --rounds 3 [--profile] [--verify 5]
        [--format mxint8] [--storage native] [--out X.json]

Builds dim 768, 12 layers, 12 heads, ffn 3072, vocab 32000 with random weights, quantises
to mxint8 (act_format "auto"), fills a KV cache with a 128-token prompt and times 64
single-token steps (median over rounds, the thread counts interleaved). ``--profile``
adds one torch.profiler pass per thread count: time in bfp_gemm / bfp_linear /
bfp_act_linear(_multi) (the GEMV kernels) against the whole step. ``--tiny`` keeps the 12
layers at dims where the kernels cost about nothing: its time per token is the overhead.
``--verify T`` times one step of T new tokens (verifying T - 1 drafts of assisted
generation) against one single-token step, alternated at the same context: the verify
cost ratio. ``--format`` picks the weight format (default mxint8; ``none`` keeps the
dense weights: their projections run ``linear_gemv``), ``--dtype`` the model's dtype
(default float32), ``--storage`` the KV cache's. ``--layouts tiles plain`` times the same
model in both weight layouts (docs/bfp.md: ``Transformer.tile_weights`` /
``untile_weights``), switched in place and alternated every round, so a noisy machine's
swings fall on both alike; each round also times the verify ratio when ``--verify`` is set.
``--parts`` (with ``--verify T``) splits the single-token step and the T-token call into
their parts with ``llmcore.ops.profile.decode_profile`` (the projections, the attention,
the small ops inside ``llmcore::decoder_layers``; the head runs in Python and is left
out), the two alternated every round, and prints per part the ms of each and their ratio:
where a verification's extra cost goes.
``--loops steps greedy`` times greedy decoding two ways, alternated every round: ``steps``
is a Python loop of ``model(tok, cache=cache)`` and an argmax per token (generate's loop
before ``decode_greedy``), ``greedy`` one ``Transformer.decode_greedy`` call (the
``llmcore::greedy_decode`` op: no Python between steps); both give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmcore.models import Transformer, TransformerConfig
from llmcore.ops.fused import argmax

PROMPT, STEPS = 128, 64


def build(storage: str = "native", tiny: bool = False, fmt: str = "mxint8",
          dtype: torch.dtype = torch.float32) -> tuple[Transformer, object, torch.Tensor]:
    torch.manual_seed(0)
    if tiny:  # the 110M's 12 layers at dims where the kernels cost ~nothing: the overhead
        cfg = TransformerConfig(dim=64, n_layers=12, n_heads=2, ffn_dim=128, vocab_size=256,
                                max_seq_len=512)
    else:
        cfg = TransformerConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072,
                                vocab_size=32000, max_seq_len=512)
    model = Transformer(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if fmt != "none":
        model.quantize(fmt)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))
    cache = model.new_cache(1, PROMPT + STEPS + 1, storage=storage)
    return model, cache, prompt


@torch.inference_mode()
def decode_ms(model, cache, prompt) -> float:
    """ms per token of STEPS single-token steps after the prompt."""
    cache.reset()
    model(prompt, cache=cache, prefill=True)
    tok = prompt[:, -1:]
    t0 = time.perf_counter()
    for _ in range(STEPS):
        model(tok, cache=cache)
    return (time.perf_counter() - t0) * 1e3 / STEPS


@torch.inference_mode()
def verify_ratio(model, cache, prompt, tokens: int = 5, reps: int = 32) -> dict:
    """ms of one cached step of ``tokens`` new tokens (verifying tokens - 1 drafts) and of
    one single-token step, alternated at the same context (each rolled back), medians."""
    cache.reset()
    model(prompt, cache=cache, prefill=True)
    n = cache.lengths[0]
    ids = prompt[:, :tokens]
    times: dict[int, list[float]] = {1: [], tokens: []}
    for _ in range(reps):
        for t in (1, tokens):
            t0 = time.perf_counter()
            model(ids[:, :t], cache=cache)
            times[t].append((time.perf_counter() - t0) * 1e3)
            cache.rollback(n)
    one, many = statistics.median(times[1]), statistics.median(times[tokens])
    return {"step_ms": one, f"verify_{tokens}_ms": many, "ratio": many / one}


@torch.inference_mode()
def profile(model, cache, prompt) -> dict:
    cache.reset()
    model(prompt, cache=cache, prefill=True)
    tok = prompt[:, -1:]
    for _ in range(4):
        model(tok, cache=cache)
    n = 16
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            model(tok, cache=cache)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / 1e3 / n
    kern = sum(e.cpu_time_total for e in ev
               if e.key in ("llmcore::bfp_gemm", "llmcore::bfp_linear", "llmcore::bfp_act_linear",
                            "llmcore::bfp_act_linear_multi", "llmcore::linear_gemv",
                            "aten::linear")) / 1e3 / n
    attn = sum(e.cpu_time_total for e in ev if e.key == "llmcore::decode_attention") / 1e3 / n
    ops = sum(e.count for e in ev if e.key.startswith("aten::")) / n
    empty = sum(e.count for e in ev if e.key in ("aten::empty", "aten::empty_strided")) / n
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:25]
    table = [(e.key, e.count // n, round(e.self_cpu_time_total / 1e3 / n, 3)) for e in top]
    return {"profiled_ms": total, "gemv_ms": kern, "decode_attention_ms": attn,
            "rest_ms": total - kern,
            "aten_ops": ops, "aten_empty": empty, "top_self_ms": table}


@torch.inference_mode()
def greedy_ms(model, cache, prompt, loop: str) -> tuple[float, list[int]]:
    """ms per token of STEPS greedy steps after the prompt, and the tokens: ``loop``
    "steps" (a forward call and an argmax per token) or "greedy" (decode_greedy)."""
    cache.reset()
    tok = argmax(model(prompt, cache=cache, prefill=True, logits_to_keep=1))
    t0 = time.perf_counter()
    if loop == "greedy":
        out = model.decode_greedy(tok, cache, STEPS)[0].tolist()
    else:
        out = []
        for _ in range(STEPS):
            tok = argmax(model(tok, cache=cache)[:, -1:])
            out.append(int(tok))
    return (time.perf_counter() - t0) * 1e3 / STEPS, out


def compare_loops(model, cache, prompt, args) -> dict:
    """ms per token of each greedy loop in args.loops, the loops and thread counts
    alternated in every round; medians over the rounds."""
    runs = {(lp, t): [] for lp in args.loops for t in args.threads}
    tokens = {}
    for r in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            for lp in args.loops if r % 2 == 0 else args.loops[::-1]:  # no order bias
                ms, tokens[lp] = greedy_ms(model, cache, prompt, lp)
                runs[(lp, t)].append(ms)
    if len({tuple(v) for v in tokens.values()}) != 1:
        raise RuntimeError("the greedy loops gave different tokens")
    out: dict = {"format": args.format, "dtype": args.dtype, "steps": STEPS, "prompt": PROMPT,
                 "loops": {}}
    for lp in args.loops:
        out["loops"][lp] = {str(t): {"ms_per_token": statistics.median(runs[(lp, t)]),
                                     "runs_ms": runs[(lp, t)]} for t in args.threads}
    if "steps" in args.loops and "greedy" in args.loops:
        out["speedup_greedy_over_steps"] = {
            str(t): out["loops"]["steps"][str(t)]["ms_per_token"]
            / out["loops"]["greedy"][str(t)]["ms_per_token"] for t in args.threads}
    return out


@torch.inference_mode()
def compare_parts(model, cache, prompt, args) -> dict:
    """Per-part ms (llmcore.ops.profile) of a single-token step and of an args.verify-token
    call at the same context (each rolled back), alternated, per thread count: medians of
    the per-round means over 16 calls."""
    from llmcore.ops.profile import PARTS, decode_profile

    tokens = args.verify
    runs = {(t, n): [] for t in args.threads for n in (1, tokens)}
    for r in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            cache.reset()
            model(prompt, cache=cache, prefill=True)
            n0 = cache.lengths[0]
            for n in (1, tokens) if r % 2 == 0 else (tokens, 1):  # no order bias
                ids = prompt[:, :n]
                model(ids, cache=cache)  # warm
                cache.rollback(n0)
                with decode_profile() as prof:
                    for _ in range(16):
                        model(ids, cache=cache)
                        cache.rollback(n0)
                runs[(t, n)].append({k: v * 1e3 / 16 for k, v in prof.seconds.items()})
    out: dict = {"format": args.format, "storage": args.storage, "verify": tokens,
                 "threads": {}}
    for t in args.threads:
        per = out["threads"][str(t)] = {}
        for k in PARTS:
            one = statistics.median(x[k] for x in runs[(t, 1)])
            many = statistics.median(x[k] for x in runs[(t, tokens)])
            if one or many:
                per[k] = {"1": one, str(tokens): many, "ratio": many / one if one else None}
        one = sum(v["1"] for v in per.values())
        many = sum(v[str(tokens)] for v in per.values())
        per["layers_total"] = {"1": one, str(tokens): many, "ratio": many / one}
        print(f"threads {t}: part, ms of 1 token, of {tokens} tokens, ratio")
        for k, v in per.items():
            print(f"  {k:12s} {v['1']:8.3f} {v[str(tokens)]:8.3f} {v['ratio'] or 0:6.2f}")
    return out


def compare_layouts(model, cache, prompt, args) -> dict:
    """ms per token (and the verify ratio) of each weight layout in args.layouts, the
    layouts and thread counts alternated in every round; medians over the rounds."""
    switch = {"tiles": model.tile_weights, "plain": model.untile_weights}
    runs = {(lay, t): [] for lay in args.layouts for t in args.threads}
    ver = {(lay, t): [] for lay in args.layouts for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            for lay in args.layouts:
                switch[lay]()
                runs[(lay, t)].append(decode_ms(model, cache, prompt))
                if args.verify:
                    ver[(lay, t)].append(verify_ratio(model, cache, prompt, args.verify, reps=16))
    out: dict = {"layouts": {}}
    for lay in args.layouts:
        per = out["layouts"][lay] = {"threads": {}}
        for t in args.threads:
            r = {"ms_per_token": statistics.median(runs[(lay, t)]), "runs_ms": runs[(lay, t)]}
            if args.verify:
                vs = ver[(lay, t)]
                key = f"verify_{args.verify}_ms"
                r["verify"] = {"step_ms": statistics.median(v["step_ms"] for v in vs),
                               key: statistics.median(v[key] for v in vs),
                               "ratio": statistics.median(v["ratio"] for v in vs),
                               "ratios": [v["ratio"] for v in vs]}
            per["threads"][str(t)] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--storage", default="native")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="dims 64 / ffn 128 / vocab 256: the per-token overhead alone")
    ap.add_argument("--verify", type=int, default=0, metavar="T",
                    help="also time one step of T new tokens (verifying T - 1 drafts) "
                         "against one single-token step, alternated: the verify cost ratio")
    ap.add_argument("--format", default="mxint8",
                    help="weight format (default mxint8; none: dense weights)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--layouts", nargs="+", choices=("tiles", "plain"),
                    help="compare these weight layouts, alternated every round")
    ap.add_argument("--loops", nargs="+", choices=("steps", "greedy"),
                    help="compare these greedy decode loops, alternated every round")
    ap.add_argument("--parts", action="store_true",
                    help="with --verify T: the step's and the T-token call's time per part "
                         "(llmcore.ops.profile), alternated")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.parts and not args.verify:
        ap.error("--parts needs --verify T")
    model, cache, prompt = build(args.storage, args.tiny, args.format, getattr(torch, args.dtype))
    if args.parts:
        res = compare_parts(model, cache, prompt, args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return
    if args.layouts or args.loops:
        res = (compare_loops if args.loops else compare_layouts)(model, cache, prompt, args)
        print(json.dumps(res, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return
    times = {t: [] for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            times[t].append(decode_ms(model, cache, prompt))
    res = {"threads": {}}
    for t in args.threads:
        torch.set_num_threads(t)
        r = {"ms_per_token": statistics.median(times[t]), "runs_ms": times[t]}
        if args.profile:
            r["profile"] = profile(model, cache, prompt)
        if args.verify:
            r["verify"] = verify_ratio(model, cache, prompt, args.verify)
        res["threads"][str(t)] = r
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
