"""`llmcore bench decode`: decode attention over a KV cache, the memory-bound step of
generation. Each new token reads the whole cache, so the figure of merit is bandwidth:
bytes of K/V read per call / time (and its fraction of the measured copy bandwidth).

Methods at each (batch, context), head_dim 128, GQA 8:1 (32 query heads, 4 KV heads),
one new token per sequence:
  SDPA                F.scaled_dot_product_attention over the valid cache, pre-laid out
                      as [B, Hkv, L, D] (layout change untimed), enable_gqa
  naive               gather + repeat_interleave + matmul + softmax + matmul
  llmcore <dtype>     ops.decode_attention over the [B, S, Hkv, D] cache
  llmcore mxint8      the same cache stored as MXINT8 (about half the bytes of 16-bit)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmcore.bench.common import Row, add_ratios, bench, measure_ceilings, progress_bar
from llmcore.ops import bfp_quantize, decode_attention

BASELINES = ["SDPA", "naive"]
H, HKV, D = 32, 4, 128


def cases(device: torch.device, quick: bool):
    if quick:
        return [(1, 256), (4, 512)]
    if device.type == "cuda":
        return [(b, c) for b in (1, 8, 32, 64) for c in (1024, 4096, 16384, 32768)]
    return [(b, c) for b in (1, 8) for c in (1024, 4096, 16384)]


def cache_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def methods(device: torch.device, batch: int, ctx: int, dtype: torch.dtype):
    """[(name, timed call, KV bytes per element)] over one fresh full cache."""
    g = torch.Generator(device=device).manual_seed(0)
    kc = torch.randn(batch, ctx, HKV, D, generator=g, device=device, dtype=dtype)
    vc = torch.randn(batch, ctx, HKV, D, generator=g, device=device, dtype=dtype)
    q = torch.randn(batch, 1, H, D, generator=g, device=device, dtype=dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    kq, vq = bfp_quantize(kc, "mxint8"), bfp_quantize(vc, "mxint8")
    kt, vt = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    qt = q.transpose(1, 2).contiguous()
    scale = 1.0 / math.sqrt(D)

    def sdpa(i):
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    def naive(i):
        k = kt.repeat_interleave(H // HKV, dim=1)
        v = vt.repeat_interleave(H // HKV, dim=1)
        p = torch.softmax((qt.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
        return (p @ v.float()).to(dtype)

    def ours(i):
        return decode_attention(q, kc, vc, lens, validate=False)

    def ours_mx(i):
        return decode_attention(q, kq, vq, lens, validate=False)

    elem = torch.finfo(dtype).bits // 8
    dt = str(dtype).removeprefix("torch.")
    return [("SDPA", sdpa, elem), ("naive", naive, elem),
            (f"llmcore {dt} cache", ours, elem), ("llmcore mxint8 cache", ours_mx, 1 + 1 / 32)]


def run_case(device: torch.device, batch: int, ctx: int, dtype: torch.dtype) -> list[Row]:
    case = f"B={batch} ctx={ctx} {str(dtype).removeprefix('torch.')}"
    rows = []
    for name, fn, bpe in methods(device, batch, ctx, dtype):
        ms = bench(fn, device, min_runs=5)
        nbytes = 2 * batch * ctx * HKV * D * bpe
        rows.append(Row("decode", case, name, ms, metric=nbytes / ms / 1e6, unit="GB/s",
                        extra={"batch": batch, "context": ctx, "tokens_per_s": batch / ms * 1e3,
                               "kv_bytes": nbytes}))
    return rows


def run(device: torch.device, quick: bool = False, progress_factory=None) -> dict:
    dtype = cache_dtype(device)
    todo = cases(device, quick)
    pbar = progress_bar(progress_factory, len(todo), "bench decode")
    copy_bw = measure_ceilings(device)["copy_GBps"]
    rows: list[Row] = []
    for batch, ctx in todo:
        rows += run_case(device, batch, ctx, dtype)
        pbar.update(1)
    pbar.close()
    add_ratios(rows, BASELINES)
    for r in rows:
        r.extra["frac_copy_bw"] = r.metric / copy_bw
    mx = [r for r in rows if r.method == "llmcore mxint8 cache"]
    native = {r.case: r for r in rows if r.method.startswith("llmcore") and r not in mx}
    lines = ["MXINT8 cache speed-up over the 16-bit cache (tokens/s):"]
    lines += [f"  {r.case}: {native[r.case].ms / r.ms:.2f}x" for r in mx if r.case in native]
    return {"rows": rows, "baselines": BASELINES, "extra": {"copy_GBps": copy_bw},
            "text": "\n".join(lines)}
