"""Peak memory and time of ``Transformer.from_pretrained``, each load in a fresh process.

Writes a random-weight checkpoint of a Llama shape with ``save_pretrained`` (the float
file, and a saved mxint8 one), then for each case starts ``python -c`` in the current
directory (so ``llmcore`` is imported from there: run it from another checkout to
measure that tree's code) that imports torch and llmcore, notes VmHWM, loads, and reports
the peak (VmHWM after the load minus the baseline) over the file size.

    python benchmarks/load_memory.py --quick                 # tiny shape, seconds
    python benchmarks/load_memory.py --dtype bfloat16 --out benchmarks/results/cpu-intel-xeon/load_memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {  # Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 kv heads, vocab 128256
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                         vocab_size=128256, tie_embeddings=True),
    "quick": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=1024,
                  vocab_size=8192, tie_embeddings=True),
}

CHILD = r"""
import json, sys, time
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
import torch, llmcore
from llmcore.models import Transformer
torch.set_num_threads(int(sys.argv[3]))
base = kb("VmHWM:")
t0 = time.perf_counter()
m = Transformer.from_pretrained(sys.argv[1], quantize=None if sys.argv[2] == "none" else sys.argv[2])
sec = time.perf_counter() - t0
print(json.dumps({"peak_mb": (kb("VmHWM:") - base) / 1024, "rss_after_mb": (kb("VmRSS:") - base) / 1024,
                  "seconds": sec, "llmcore": llmcore.__file__}))
"""


def file_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def measure(model_dir: Path, quantize: str | None, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), quantize or "none",
                          str(threads)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["file_mb"] = file_mb(model_dir)
    r["peak_over_file"] = r["peak_mb"] / r["file_mb"]
    return r


def write_checkpoints(shape: str, dtype: str, root: Path, reuse: bool) -> tuple[Path, Path]:
    import torch

    from llmcore.models import Transformer, TransformerConfig

    float_dir, q_dir = root / f"{shape}-{dtype}", root / f"{shape}-{dtype}-mxint8"
    if reuse and float_dir.exists() and q_dir.exists():
        return float_dir, q_dir
    cfg = TransformerConfig(**SHAPES[shape], max_seq_len=2048)
    with torch.device("meta"):
        m = Transformer(cfg, dtype=getattr(torch, dtype))
    m = m.to_empty(device="cpu")
    m._tie_and_rope()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m.save_pretrained(str(float_dir))
    del m
    Transformer.from_pretrained(str(float_dir), quantize="mxint8").save_pretrained(str(q_dir))
    return float_dir, q_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small 'quick' shape")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--root", type=Path, default=None,
                    help="where the checkpoints go (default: a temporary folder, removed)")
    ap.add_argument("--reuse", action="store_true", help="keep and reuse checkpoints in --root")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="plain,mxint8,mxint4,saved-mxint8")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    shape = "quick" if a.quick else a.shape
    root = a.root or Path(tempfile.mkdtemp(prefix="llmcore-load-"))
    try:
        float_dir, q_dir = write_checkpoints(shape, a.dtype, root, a.reuse)
        cases = {"plain": (float_dir, None), "mxint8": (float_dir, "mxint8"),
                 "mxint4": (float_dir, "mxint4"), "saved-mxint8": (q_dir, None)}
        results = {}
        for name in a.cases.split(","):
            d, q = cases[name]
            r = results[name] = measure(d, q, a.threads)
            print(f"{shape} {a.dtype} {name:13s} file {r['file_mb']:8.1f} MB  peak "
                  f"{r['peak_mb']:8.1f} MB  ({r['peak_over_file']:.2f}x file)  after "
                  f"{r['rss_after_mb']:8.1f} MB  {r['seconds']:6.2f} s", flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
            a.out.write_text(json.dumps({"shape": shape, "config": SHAPES[shape],
                                         "dtype": a.dtype, "threads": a.threads,
                                         "command": " ".join(["python", *sys.argv]),
                                         "commit": commit, "results": results},
                                        indent=2) + "\n")
        return results
    finally:
        if a.root is None or not a.reuse:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
