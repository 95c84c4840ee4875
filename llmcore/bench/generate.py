"""`llmcore bench generate`: end-to-end decode and prefill of a Llama-shaped model with
random weights (docs/benchmarks.md).

For each preset and batch size, a fixed prompt of 128 tokens is prefilled into a static KV
cache, then N decode steps (one token per sequence each) are timed. Methods:
  torch fp32 / torch bf16     backend="torch": F.linear + SDPA over the cache (baseline)
  llmcore fp32 / bf16         backend="llmcore": llmcore ops (attention, decode_attention)
  llmcore mxint8              model.quantize("mxint8") (every linear, the head included), fp32
  llmcore mxint8 + mxint8 kv  the same with the KV cache stored as MXINT8
Decode rows report tokens/s (batch × steps/s) and, in ``extra``, the bandwidth achieved:
(bytes of weights + bytes of KV read per step) × steps/s. Prefill rows report tokens/s.
Full run: 124M at batch 1 and 8 (N=32), plus the 1B shape on CUDA; quick: tiny, N=8.
"""

from __future__ import annotations

import torch

from llmcore.bench.common import Row, add_ratios, bench, progress_bar
from llmcore.models import Transformer, TransformerConfig

BASELINES = ["torch fp32"]
PROMPT = 128
METHODS = [  # name, backend, dtype, quantize, kv storage
    ("torch fp32", "torch", torch.float32, None, "native"),
    ("llmcore fp32", "llmcore", torch.float32, None, "native"),
    ("torch bf16", "torch", torch.bfloat16, None, "native"),
    ("llmcore bf16", "llmcore", torch.bfloat16, None, "native"),
    ("llmcore mxint8", "llmcore", torch.float32, "mxint8", "native"),
    ("llmcore mxint8 + mxint8 kv", "llmcore", torch.float32, "mxint8", "mxint8"),
]


def plan(device: torch.device, quick: bool):
    """[(preset, batches, decode steps)]"""
    if quick:
        return [("tiny", (1, 8), 8)]
    out = [("124M", (1, 8), 32)]
    if device.type == "cuda":
        out.append(("1B", (1, 8), 32))
    return out


def weight_bytes(model: Transformer) -> int:
    """Bytes read per decode step for the weights: every parameter and buffer once,
    except the input embedding table (only a few rows are gathered) unless it is tied to
    the output head."""
    seen, total = set(), 0
    head = {t.data_ptr() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "inv_freq" or t.data_ptr() in seen:
            continue
        if name.startswith("embed_tokens.") and t.data_ptr() not in head:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kv_bytes(cfg: TransformerConfig, batch: int, context: float, storage: str,
             dtype: torch.dtype) -> float:
    per_elem = 1 + 1 / 32 if storage == "mxint8" else torch.finfo(dtype).bits // 8
    return 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim * per_elem


def build(preset, backend, dtype, quant, device) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig.from_name(preset)
    model = Transformer(cfg, backend=backend, device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if quant:
        model.quantize(quant)
    return model


def timed_calls(model: Transformer, prompt: torch.Tensor, steps: int, storage: str):
    """(prefill, decode), timed calls ``fn(i)`` over one KV cache: ``prefill`` fills the
    cache with ``prompt`` [B, T] from empty; ``decode`` rolls it back to the prompt and
    decodes ``steps`` tokens one at a time. The cache starts out holding the prompt."""
    b, plen = prompt.shape
    cache = model.new_cache(b, plen + steps + 1, storage=storage)
    tok = prompt[:, -1:]

    def prefill(i):
        cache.reset()
        return model(prompt, cache=cache, prefill=True)

    def decode(i):
        cache.rollback(plen)
        for _ in range(steps):
            model(tok, cache=cache)

    prefill(0)
    return prefill, decode


@torch.inference_mode()
def run_preset(device, preset, batches, steps, progress=None) -> list[Row]:
    rows = []
    for name, backend, dtype, quant, storage in METHODS:
        model = build(preset, backend, dtype, quant, device)
        cfg = model.config
        wbytes = weight_bytes(model)
        g = torch.Generator().manual_seed(1)
        for b in batches:
            prompt = torch.randint(0, cfg.vocab_size, (b, PROMPT), generator=g).to(device)
            prefill, decode = timed_calls(model, prompt, steps, storage)
            runs = 3 if device.type == "cuda" else 2  # keep the full CPU run to minutes
            pre_ms = bench(prefill, device, warmup=1, min_runs=runs, min_time_s=0.0)
            ms = bench(decode, device, warmup=1, min_runs=runs, min_time_s=0.0) / steps
            kv = kv_bytes(cfg, b, PROMPT + (steps + 1) / 2, storage, dtype)
            bw = (wbytes + kv) / ms / 1e6  # GB/s
            extra = {"preset": preset, "batch": b, "prompt": PROMPT, "steps": steps,
                     "ms_per_step": ms, "weight_bytes": wbytes, "kv_bytes_per_step": kv,
                     "bandwidth_GBps": bw, "backend": backend,
                     "dtype": str(dtype).removeprefix("torch."), "quantize": quant,
                     "kv_cache": storage}
            rows.append(Row("generate", f"decode B={b} {preset}", name, ms,
                            metric=b / ms * 1e3, unit="tok/s", extra=extra))
            rows.append(Row("generate", f"prefill B={b} T={PROMPT} {preset}", name, pre_ms,
                            metric=b * PROMPT / pre_ms * 1e3, unit="tok/s",
                            extra={"preset": preset, "batch": b, "prompt": PROMPT,
                                   "backend": backend, "kv_cache": storage}))
            if progress is not None:
                progress.update(1)
    return rows


@torch.inference_mode()
def quality(device, preset: str, rows: int = 4, length: int = 256) -> dict:
    """How far BFP weights move the model: sample ``rows`` x ``length`` tokens from the fp32
    model (temperature 1), then score them with the fp32 and the quantised models:
    perplexity, KL(fp32 || quantised) per token and top-1 agreement of the next-token
    distributions. (Random weights: the absolute perplexity is near the vocabulary size;
    the change is what matters.)"""
    from llmcore.generation import generate

    ref = build(preset, "llmcore", torch.float32, None, device)
    g = torch.Generator(device=device).manual_seed(3)
    start = torch.randint(0, ref.config.vocab_size, (rows, 1), generator=g, device=device)
    text = generate(ref, start, length - 1, temperature=1.0, generator=g)
    logp_ref = torch.log_softmax(ref(text).float(), -1)[:, :-1]
    target = text[:, 1:]
    out = {}
    for fmt in ("fp32", "mxint8", "mxint4"):
        m = ref if fmt == "fp32" else build(preset, "llmcore", torch.float32, fmt, device)
        logp = logp_ref if fmt == "fp32" else torch.log_softmax(m(text).float(), -1)[:, :-1]
        nll = -logp.gather(-1, target.unsqueeze(-1)).mean().item()
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()
        top1 = (logp.argmax(-1) == logp_ref.argmax(-1)).float().mean().item()
        out[fmt] = {"perplexity": float(torch.tensor(nll).exp()), "kl_vs_fp32": kl,
                    "top1_agreement": top1}
    return out


def run(device: torch.device, quick: bool = False, progress_factory=None) -> dict:
    todo = plan(device, quick)
    total = sum(len(METHODS) * len(bs) for _, bs, _ in todo)
    pbar = progress_bar(progress_factory, total, "bench generate")
    rows: list[Row] = []
    for preset, batches, steps in todo:
        rows += run_preset(device, preset, batches, steps, pbar)
    pbar.close()
    rows.sort(key=lambda r: (not r.case.startswith("decode"), r.case))
    add_ratios(rows, BASELINES)
    lines = ["Decode bandwidth achieved ((weight bytes + KV bytes read) x steps/s):"]
    lines += [f"  {r.case:18s} {r.method:28s} {r.extra['bandwidth_GBps']:8.2f} GB/s"
              for r in rows if r.case.startswith("decode")]
    q = quality(device, todo[0][0], rows=2 if quick else 4, length=32 if quick else 256)
    base = q["fp32"]["perplexity"]
    lines += ["", f"Quality ({todo[0][0]}, scoring fp32 samples; random weights):",
              "  weights  perplexity  change    KL vs fp32  top-1 agreement"]
    lines += [f"  {k:7s}  {v['perplexity']:10.2f}  {v['perplexity'] / base - 1:+7.3%}  "
              f"{v['kl_vs_fp32']:10.2e}  {v['top1_agreement']:8.2%}" for k, v in q.items()]
    return {"rows": rows, "baselines": BASELINES,
            "extra": {"prompt_tokens": PROMPT, "quality": q}, "text": "\n".join(lines)}
