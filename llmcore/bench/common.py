"""Benchmark machinery shared by every suite.

Timing follows docs/benchmarks.md: warm up, rotate inputs so the working set exceeds the last-level
cache, take the median of many runs, CUDA events on the GPU. Every result row carries the
baseline it is compared with, so a suite reports ratios measured in one process.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from llmcore.ops.memory import hugepages_enabled


@dataclass
class Row:
    """One measurement: a method on a case, with its throughput and baseline ratios."""

    suite: str
    case: str  # e.g. "M=1 K=4096 N=4096"
    method: str  # e.g. "llmcore mxint8 (weight-only)"
    ms: float
    metric: float | None = None  # GB/s, TFLOP/s, TOPS ... (see unit)
    unit: str = ""
    ratios: dict[str, float] = field(default_factory=dict)  # baseline method -> its ms / ours
    extra: dict = field(default_factory=dict)


def llc_bytes() -> int:
    """Size of the last-level CPU cache (32 MiB when it cannot be read)."""
    for idx in (3, 2):
        p = f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size"
        try:
            with open(p) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            return int(s.rstrip("KMG")) * mult
        except OSError:
            continue
    return 32 << 20


def rotation_count(bytes_per_set: int, device: torch.device, cap: int = 64) -> int:
    """How many input sets to rotate through so their total exceeds the cache (x2)."""
    cache = llc_bytes() if device.type == "cpu" else _gpu_l2_bytes(device)
    return max(1, min(cap, -(-2 * cache // max(1, bytes_per_set))))


def _gpu_l2_bytes(device: torch.device) -> int:
    try:
        return torch.cuda.get_device_properties(device).L2_cache_size
    except (AttributeError, RuntimeError):
        return 50 << 20


def bench(fn: Callable[[int], object], device: torch.device, *, warmup: int = 3,
          min_runs: int = 5, max_runs: int = 200, min_time_s: float = 0.25) -> float:
    """Median milliseconds of ``fn(i)`` (i = call index, for rotating inputs)."""
    i = 0
    for _ in range(warmup):
        fn(i)
        i += 1
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_all = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start_all < min_time_s
                                        and len(times) < max_runs):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(i)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
            i += 1
    else:
        start_all = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start_all < min_time_s
                                        and len(times) < max_runs):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
            i += 1
    return statistics.median(times)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device: torch.device) -> dict:
    """What the device can do at best, for the "fraction of peak" columns: copy bandwidth
    (GB/s, read + write) and, on GPU, bf16 matmul TFLOP/s."""
    n = (256 << 20) // 4 if device.type == "cpu" else (1 << 30) // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    a.fill_(1.0)
    ms = bench(lambda i: b.copy_(a), device, warmup=2, min_runs=5)
    out = {"copy_GBps": 2 * a.numel() * 4 / ms / 1e6}
    if device.type == "cuda":
        m = 8192
        x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        ms = bench(lambda i: x @ y, device, warmup=3, min_runs=10)
        out["bf16_matmul_TFLOPs"] = 2 * m**3 / ms / 1e9
    return out


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def write(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(factory, total: int, desc: str):
    """A progress bar from ``factory(total=, desc=)`` (tqdm-like: update, write, close),
    or one that shows nothing when ``factory`` is None."""
    return factory(total=total, desc=desc) if factory is not None else _NoProgress()


def add_ratios(rows: Sequence[Row], baselines: Sequence[str]) -> None:
    """For each case, set row.ratios[b] = ms(b) / ms(row): > 1 means faster than b."""
    by_case: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.method] = r
    for r in rows:
        for b in baselines:
            base = by_case[r.case].get(b)
            if base is not None and r.method != b and r.ms > 0:
                r.ratios[b] = base.ms / r.ms


# ---------------------------------------------------------------------------------------
# Environment, results files, tables, plots
# ---------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Everything needed to reproduce or compare a result file."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        # whether models and caches went into 2 MB pages (llmcore.ops.memory; "auto")
        "hugepages": device.type == "cpu" and hugepages_enabled(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, cuda=torch.version.cuda, sm=f"{p.major}{p.minor}",
                   multiprocessors=p.multi_processor_count)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env


def device_slug(device: torch.device) -> str:
    """Folder name under benchmarks/results/: "h100", "h200", "cpu-amd-epyc", ..."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    words = re.sub(r"\(.*?\)|\d+-core|processor", "", _cpu_model().lower()).split()
    return "cpu-" + "-".join(re.sub(r"[^a-z0-9]+", "", w) for w in words[:3] if w)


def write_results(suite: str, rows: Sequence[Row], device: torch.device, out_dir: str,
                  extra: dict | None = None) -> str:
    """Write ``<out_dir>/<device>/<suite>.json`` atomically; returns the path."""
    folder = os.path.join(out_dir, device_slug(device))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{suite}.json")
    doc = {"suite": suite, "environment": environment(device),
           "rows": [asdict(r) for r in rows], **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def format_table(rows: Sequence[Row], baselines: Sequence[str]) -> str:
    """A plain-text table: case, method, ms, throughput, ratio to each baseline."""
    head = ["case", "method", "ms", "throughput", *[f"x {b}" for b in baselines]]
    body = []
    for r in rows:
        tp = f"{r.metric:.2f} {r.unit}" if r.metric is not None else ""
        body.append([r.case, r.method, f"{r.ms:.3f}", tp,
                     *[f"{r.ratios[b]:.2f}" if b in r.ratios else "" for b in baselines]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def plot_ratios(rows: Sequence[Row], baseline: str, path: str, title: str) -> str | None:
    """Bar chart of each method's speed relative to ``baseline`` per case (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys(r.case for r in rows))
    methods = [m for m in dict.fromkeys(r.method for r in rows) if m != baseline]
    if not cases or not methods:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2), 4.5))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((r.ratios.get(baseline, 0.0) for r in rows
                      if r.case == c and r.method == m), 0.0) for c in cases]
        ax.bar([i + j * w for i in range(len(cases))], vals, width=w, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))], cases, rotation=15, fontsize=8)
    ax.set_ylabel(f"speed-up over {baseline}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
