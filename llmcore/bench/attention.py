"""`llmcore bench attention`: fused attention forward and forward+backward against
PyTorch SDPA on the same device (its flash backend on GPU), in one process.

Each case reports ms, achieved TFLOP/s (forward 4·B·H·Sq·Sk·D, halved when causal;
forward+backward counted as 3.5x the forward, the FlashAttention convention), the ratio
to SDPA and, on GPU, the fraction of the measured bf16 tensor-core peak. Each side gets
its native layout (llmcore [B, S, H, D], SDPA [B, H, S, D]) so no transpose is timed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llmcore.bench.common import Row, add_ratios, bench, measure_ceilings, progress_bar
from llmcore.ops import attention

BASELINE = "SDPA"


def _sdpa_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def cases(device: torch.device, quick: bool):
    """(batch, heads, seq, head_dim, causal, dtype) tuples."""
    if quick:
        return [(1, 4, s, 64, c, torch.float32 if device.type == "cpu" else torch.bfloat16)
                for s in (128, 256) for c in (False, True)]
    if device.type == "cuda":
        out = []
        for d, h in ((64, 32), (128, 16)):
            for s in (512, 1024, 2048, 4096, 8192):
                out += [(max(1, 16384 // s), h, s, d, c, torch.bfloat16) for c in (False, True)]
        return out
    out = [(1, h, s, d, c, torch.float32) for d, h in ((64, 16), (128, 8))
           for s in (512, 1024, 2048, 4096) for c in (False, True)]
    out += [(1, 8, 1024, 128, c, torch.bfloat16) for c in (False, True)]
    return out


def _flops(b, h, s, d, causal):
    return 4 * b * h * s * s * d * (0.5 if causal else 1.0)


def methods(device, b, h, s, d, causal, dtype, with_backward: bool):
    """[(name, timed call)]: llmcore and SDPA on the same fresh inputs, each in its native
    layout (llmcore [B, S, H, D], SDPA [B, H, S, D])."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v, do = (rnd(b, s, h, d) for _ in range(4))
    qt, kt, vt, dot = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))
    for t in (q, k, v, qt, kt, vt):
        t.requires_grad_(with_backward)

    def ours(i):
        o = attention(q, k, v, causal=causal)
        if with_backward:
            o.backward(do)

    def sdpa(i):
        with _sdpa_context(device):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            if with_backward:
                o.backward(dot)

    return [("llmcore", ours), (BASELINE, sdpa)]


def run_case(device, b, h, s, d, causal, dtype, with_backward: bool) -> list[Row]:
    kind = "fwd+bwd" if with_backward else "fwd"
    case = (f"{kind} B={b} H={h} S={s} D={d}{' causal' if causal else ''} "
            f"{str(dtype).removeprefix('torch.')}")
    flops = _flops(b, h, s, d, causal) * (3.5 if with_backward else 1.0)
    big = flops > 5e10 and device.type == "cpu"
    rows = []
    for name, fn in methods(device, b, h, s, d, causal, dtype, with_backward):
        ms = bench(fn, device, warmup=1 if big else 3, min_runs=3 if big else 5,
                   min_time_s=0.1 if big else 0.25)
        rows.append(Row("attention", case, name, ms, metric=flops / ms / 1e9, unit="TFLOP/s",
                        extra={"B": b, "H": h, "S": s, "D": d, "causal": causal,
                               "dtype": str(dtype), "pass": kind}))
    return rows


def run(device: torch.device, quick: bool = False, progress_factory=None) -> dict:
    todo = cases(device, quick)
    pbar = progress_bar(progress_factory, 2 * len(todo), "bench attention")
    rows: list[Row] = []
    peak = measure_ceilings(device).get("bf16_matmul_TFLOPs") if device.type == "cuda" else None
    for with_bwd in (False, True):
        for case in todo:
            rows += run_case(device, *case, with_backward=with_bwd)
            pbar.update(1)
    pbar.close()
    add_ratios(rows, [BASELINE])
    if peak:
        for r in rows:
            r.extra["frac_bf16_peak"] = r.metric / peak
    return {"rows": rows, "baselines": [BASELINE], "extra": {"bf16_peak_TFLOPs": peak}}
