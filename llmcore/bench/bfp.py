"""`llmcore bench bfp`: BFP quantisation throughput, BFP linear layers against fp32 / bf16
/ fp16 / int8 baselines, and the accuracy of each format.

Methods compared at each (M, K, N), all in one process:
  fp32 / bf16 / fp16 F.linear     dense baselines (cuBLAS on GPU, oneDNN/MKL on CPU)
  int8 _int_mm                    int8 x int8 -> int32, activations pre-quantised (untimed)
  int8 _weight_int8pack_mm        weight-only int8 with per-channel scales
  llmcore <fmt> W                 bfp_linear weight-only (float activations)
  llmcore mxint8 x mxint8         bfp_linear(act_format="mxint8"): activations quantised on
                                  the fly (timed) and integer block products
Inputs rotate through enough weight sets to exceed the last-level cache (cold weights,
as in decoding); the median of many timed calls is reported.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmcore.bench.common import (
    Row,
    add_ratios,
    bench,
    measure_ceilings,
    progress_bar,
    rotation_count,
    sync,
)
from llmcore.formats import PRESETS, get_format
from llmcore.ops import bfp_linear, bfp_quantize

BASELINES_CPU = ["fp32 F.linear", "bf16 F.linear", "int8 _int_mm"]
BASELINES_GPU = ["fp16 F.linear", "bf16 F.linear", "int8 _int_mm"]


def baselines(device: torch.device) -> list[str]:
    return BASELINES_GPU if device.type == "cuda" else BASELINES_CPU


def linear_methods(device: torch.device, m: int, k: int, n: int
                    ) -> list[tuple[str, Callable[[], Callable[[int], object]], int]]:
    """(name, builder, weight bytes per set). A builder allocates rotated inputs and
    returns the timed call; building lazily keeps only one method's weights alive."""
    gpu = device.type == "cuda"
    wdtype = torch.float16 if gpu else torch.float32  # activation dtype of the BFP paths

    def dense(dtype):
        def build():
            x = torch.randn(m, k, device=device, dtype=dtype)
            ws = [torch.randn(n, k, device=device, dtype=dtype)
                  for _ in range(rotation_count(n * k * x.element_size(), device))]
            return lambda i: F.linear(x, ws[i % len(ws)])
        return build

    def int_mm():
        x = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
        ws = [torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8).T
              for _ in range(rotation_count(n * k, device))]
        return lambda i: torch._int_mm(x, ws[i % len(ws)])

    def int8pack():
        dt = torch.bfloat16
        x = torch.randn(m, k, device=device, dtype=dt)
        ws = [(torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8),
               torch.rand(n, device=device, dtype=dt)) for _ in range(rotation_count(n * k, device))]
        return lambda i: torch.ops.aten._weight_int8pack_mm(x, *ws[i % len(ws)])

    def bfp(fmt, act=None, xdtype=wdtype):
        f = get_format(fmt)

        def build():
            x = torch.randn(m, k, device=device, dtype=xdtype)
            per = math.ceil(n * k * f.bits_per_element / 8)
            ws = [bfp_quantize(torch.randn(n, k, device=device), f)
                  for _ in range(rotation_count(per, device))]
            return lambda i: bfp_linear(x, ws[i % len(ws)], act_format=act)
        return build

    methods = [("fp32 F.linear", dense(torch.float32), 4), ("bf16 F.linear", dense(torch.bfloat16), 2)]
    if gpu:
        methods.append(("fp16 F.linear", dense(torch.float16), 2))
    if not gpu or m > 16:  # cuBLASLt int8 needs M > 16
        methods.append(("int8 _int_mm", int_mm, 1))
    if not gpu:
        methods.append(("int8 _weight_int8pack_mm (bf16 x)", int8pack, 1))
    xname = "fp16 x" if gpu else "fp32 x"
    methods += [
        (f"llmcore mxint8 W ({xname})", bfp("mxint8"), 1),
        (f"llmcore mxint4 W ({xname})", bfp("mxint4"), 0.5),
    ]
    if not gpu:  # bf16 activations: the usual CPU inference dtype
        methods.append(("llmcore mxint8 W (bf16 x)", bfp("mxint8", xdtype=torch.bfloat16), 1))
    methods.append(("llmcore mxint8 x mxint8", bfp("mxint8", "mxint8"), 1))
    return methods


def plan(device: torch.device, quick: bool) -> tuple[list[int], list[tuple[int, int]],
                                                    tuple[int, int]]:
    """(M values, (K, N) weight shapes, the quantised tensor's size)."""
    if quick:
        return [1, 16, 256], [(1024, 1024)], (1024, 1024)
    if device.type == "cuda":
        return [1, 16, 256, 2048], [(4096, 4096), (4096, 14336)], (8192, 8192)
    return [1, 16, 256, 2048], [(4096, 4096)], (4096, 4096)


def run_linear(device: torch.device, ms_list, shapes, progress=None) -> list[Row]:
    rows: list[Row] = []
    for k, n in shapes:
        for m in ms_list:
            case = f"M={m} K={k} N={n}"
            for name, build, wbytes in linear_methods(device, m, k, n):
                try:
                    fn = build()
                    ms = bench(fn, device, min_runs=5 if m * k * n < 1e10 else 3)
                except (RuntimeError, NotImplementedError) as e:  # baseline unsupported here
                    if progress is not None:
                        progress.write(f"skip {name} at {case}: {str(e).splitlines()[0][:100]}")
                    continue
                finally:
                    fn = None
                    sync(device)
                flops = 2 * m * k * n
                gbps = (n * k * wbytes + m * k * 4 + m * n * 4) / ms / 1e6
                unit_is_bw = m <= 16
                rows.append(Row("bfp", case, name, ms,
                                metric=gbps if unit_is_bw else flops / ms / 1e9,
                                unit="GB/s" if unit_is_bw else "TFLOP/s",
                                extra={"M": m, "K": k, "N": n, "GBps": gbps,
                                       "TFLOPs": flops / ms / 1e9}))
                if progress is not None:
                    progress.update(1)
    add_ratios(rows, [*baselines(device), "int8 _weight_int8pack_mm (bf16 x)"])
    return rows


def run_quantize(device: torch.device, size=(4096, 4096), progress=None) -> list[Row]:
    rows = []
    x = torch.randn(*size, device=device)
    for name, f in PRESETS.items():
        ms = bench(lambda i, f=f: bfp_quantize(x, f), device)
        out_bytes = x.numel() * f.bits_per_element / 8
        gbps = (x.numel() * 4 + out_bytes) / ms / 1e6
        rows.append(Row("bfp", f"quantize {size[0]}x{size[1]} fp32", f"bfp_quantize {name}", ms,
                        metric=gbps, unit="GB/s"))
        if progress is not None:
            progress.update(1)
    return rows


def accuracy_table(n_rows: int = 512, k: int = 4096, seed: int = 0) -> list[dict]:
    """Relative Frobenius error of each format vs fp32 on Gaussian and outlier-heavy data,
    beside int8 with per-row absmax scaling, bf16 and fp16."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(n_rows, k, generator=g)
    # LLM activations: a few channels carry outliers 20-100x larger, plus heavy tails.
    outl = torch.distributions.StudentT(4.0).sample((n_rows, k))
    chans = torch.randperm(k, generator=g)[: max(1, k // 256)]
    outl[:, chans] *= torch.empty(len(chans)).uniform_(20, 100, generator=g)
    data = {"gaussian": gauss, "outlier-heavy": outl}

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    def int8_rowwise(x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        return (x / s).round().clamp(-127, 127) * s

    table = []
    methods = {name: (lambda x, f=f: bfp_quantize(x, f).dequantize())
               for name, f in PRESETS.items()}
    methods["int8 per-row absmax"] = int8_rowwise
    methods["bf16"] = lambda x: x.bfloat16().float()
    methods["fp16"] = lambda x: x.half().float()
    for name, q in methods.items():
        f = PRESETS.get(name)
        table.append({"format": name,
                      "bits/elem": f.bits_per_element if f else (8.0 if "int8" in name else 16.0),
                      **{dist: rel(q(x), x) for dist, x in data.items()}})
    return table


def format_accuracy(table: list[dict]) -> str:
    lines = [f"{'format':<22}{'bits/elem':>10}{'gaussian':>12}{'outlier-heavy':>15}"]
    for r in table:
        lines.append(f"{r['format']:<22}{r['bits/elem']:>10.2f}{r['gaussian']:>12.2e}"
                     f"{r['outlier-heavy']:>15.2e}")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, progress_factory=None) -> dict:
    """The whole suite; returns {"rows", "baselines", "extra", "text"}."""
    ms_list, shapes, qsize = plan(device, quick)
    n_methods = len(linear_methods(device, 256, 64, 64))
    total = len(PRESETS) + len(ms_list) * len(shapes) * n_methods
    pbar = progress_bar(progress_factory, total, "bench bfp")
    ceilings = measure_ceilings(device)
    rows = run_quantize(device, qsize, pbar) + run_linear(device, ms_list, shapes, pbar)
    pbar.close()
    for r in rows:
        if r.unit == "GB/s":
            r.extra["frac_copy_bw"] = r.metric / ceilings["copy_GBps"]
        elif r.unit == "TFLOP/s" and "bf16_matmul_TFLOPs" in ceilings:
            r.extra["frac_bf16_peak"] = r.metric / ceilings["bf16_matmul_TFLOPs"]
    acc = accuracy_table(n_rows=128 if quick else 512, k=1024 if quick else 4096)
    return {"rows": rows, "baselines": baselines(device),
            "extra": {"ceilings": ceilings, "accuracy": acc},
            "text": "Accuracy (relative Frobenius error vs fp32):\n" + format_accuracy(acc)}


# ---------------------------------------------------------------------------------------
# Prefill: the int8-activation GEMM (M > 16) before / after, interleaved in one process
# ---------------------------------------------------------------------------------------
# (K, N) of the Llama 110M (dim 768, vocab 32000) and 1B (dim 2048) projections.
PREFILL_SHAPES = {"110M": [(768, 768), (768, 2304), (768, 3072), (3072, 768), (768, 32000)],
                  "1B": [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]}
# The CPU kernel paths compared: LLMCORE_CPU_ISA is read on every call, so one process
# alternates them. "avx512" is the packed-panel VNNI GEMM (what M > 16 ran before the AMX
# kernel); "" lets the library pick its best path (AMX tiles where the CPU has them).
PREFILL_PATHS = {"before (packed VNNI)": "avx512", "after (best: AMX)": ""}


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, paths: dict[str, str]
                 ) -> dict[str, float]:
    """Median ms of each fn, calls interleaved A, B, A, B ... (the machine is shared)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    old = os.environ.get("LLMCORE_CPU_ISA")
    try:
        for r in range(rounds + 1):
            for name, fn in fns.items():
                os.environ["LLMCORE_CPU_ISA"] = paths.get(name, "")
                t0 = time.perf_counter()
                fn()
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        if old is None:
            os.environ.pop("LLMCORE_CPU_ISA", None)
        else:
            os.environ["LLMCORE_CPU_ISA"] = old
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def run_prefill_gemm(ms_list=(128, 512), threads=(1, 2), models=("110M", "1B"),
                     rounds: int = 7, progress=None) -> list[Row]:
    """``bfp_linear(x, w, act_format="mxint8")`` at prefill sizes, before / after, with
    torch's bf16 / fp32 F.linear at the same shapes as a yardstick; GFLOP/s (x quantisation
    included)."""
    rows: list[Row] = []
    saved = torch.get_num_threads()
    try:
        for th in threads:
            torch.set_num_threads(th)
            for model in models:
                for k, n in PREFILL_SHAPES[model]:
                    w = torch.randn(n, k)
                    qs = {f: bfp_quantize(w, f) for f in ("mxint8", "mxint4")}
                    for m in ms_list:
                        x = torch.randn(m, k)
                        xb, wb = x.bfloat16(), w.bfloat16()
                        fns: dict[str, Callable[[], object]] = {
                            "fp32 F.linear": lambda x=x, w=w: F.linear(x, w),
                            "bf16 F.linear": lambda xb=xb, wb=wb: F.linear(xb, wb)}
                        paths = {}
                        for f, q in qs.items():
                            for label, isa in PREFILL_PATHS.items():
                                name = f"llmcore {f} x mxint8 {label}"
                                fns[name] = lambda x=x, q=q: bfp_linear(x, q, act_format="mxint8")
                                paths[name] = isa
                        med = _interleaved(fns, rounds, paths)
                        case = f"{model} M={m} K={k} N={n} threads={th}"
                        for name, ms in med.items():
                            rows.append(Row("prefill_gemm", case, name, ms,
                                            metric=2 * m * k * n / ms / 1e6, unit="GFLOP/s",
                                            extra={"model": model, "M": m, "K": k, "N": n,
                                                   "threads": th}))
                        if progress is not None:
                            progress(rows[-len(med):])
    finally:
        torch.set_num_threads(saved)
    return rows


@torch.inference_mode()
def run_prefill_model(tokens=(128, 512), threads=(1, 2), formats=("mxint8", "mxint4"),
                      rounds: int = 5, progress=None) -> list[Row]:
    """Prefill of a random Llama 110M (dim 768, 12 layers, vocab 32000) quantised with
    ``Transformer.quantize(fmt)`` (int8 activations), before / after, interleaved."""
    from llmcore.models import Transformer, TransformerConfig

    cfg = TransformerConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                            ffn_dim=2048, max_seq_len=1024)
    rows: list[Row] = []
    saved = torch.get_num_threads()
    try:
        for fmt in formats:
            torch.manual_seed(0)
            model = Transformer(cfg).eval()
            for p in model.parameters():
                p.normal_(0, 0.02)
            model.quantize(fmt)
            for th in threads:
                torch.set_num_threads(th)
                for t in tokens:
                    prompt = torch.randint(0, cfg.vocab_size, (1, t))
                    cache = model.new_cache(1, t + 1)

                    def prefill(model=model, prompt=prompt, cache=cache):
                        cache.reset()
                        return model(prompt, cache=cache, prefill=True)
                    fns = {label: prefill for label in PREFILL_PATHS}
                    med = _interleaved(fns, rounds, PREFILL_PATHS)
                    for label, ms in med.items():
                        rows.append(Row("prefill_model", f"110M {fmt} T={t} threads={th}",
                                        f"llmcore {fmt} {label}", ms, metric=t / ms * 1e3,
                                        unit="tok/s", extra={"format": fmt, "tokens": t,
                                                             "threads": th}))
                    if progress is not None:
                        progress(rows[-len(med):])
    finally:
        torch.set_num_threads(saved)
    return rows


def write_prefill_results(out_dir: str = "benchmarks/results", rounds: int = 5) -> str:
    """Run the prefill GEMM and model benches on the CPU and write
    ``<out_dir>/<cpu>/prefill_gemm.json`` (``python -m llmcore.bench.bfp``)."""
    import sys

    from llmcore.bench.common import format_table, write_results

    def show(rows):
        for r in rows:
            print(f"{r.case:40s} {r.method:40s} {r.ms:9.2f} ms {r.metric:8.1f} {r.unit}",
                  file=sys.stderr, flush=True)

    cpu = torch.device("cpu")
    rows = run_prefill_gemm(rounds=rounds, progress=show)
    rows += run_prefill_model(rounds=rounds, progress=show)
    cmd = "python -m llmcore.bench.bfp"
    return write_results("prefill_gemm", rows, cpu, out_dir,
                         {"command": cmd, "paths": PREFILL_PATHS,
                          "text": format_table(rows, [])})


if __name__ == "__main__":
    print(write_prefill_results())
