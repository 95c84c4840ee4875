"""``llmcore demo``: the library end to end on the Python standard library, with no
download — kernels checked and timed, a model pretrained with fp32 and with MXINT8 GEMMs,
the cleaning pipeline, SFT then preference tuning, plain vs assisted generation, and the
Chinchilla fit turned into a plan for this machine — into one run folder with every figure
as JSON, the plots as PNG and an ``index.html`` that shows them on one page.

Every section calls the library's own entry points (the recipes, ``clean_corpus``,
``assisted_generate``, ``fit_chinchilla``, the bench suites' cases): the demo only picks
sizes and orchestrates. :data:`SIZES` holds the sizes: ``quick`` (a slice of the stdlib,
about 2 minutes on 2 CPU cores), ``full`` (the whole stdlib, about 10 minutes) and
``gpu`` (what ``full`` becomes on a CUDA device: the same sections, larger models).
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# The stdlib slice of the quick demo: about a hundred files of ordinary library code.
QUICK_SLICE = ("json", "email", "collections", "http", "logging", "csv.py", "textwrap.py",
               "string.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "glob.py",
               "argparse.py", "dataclasses.py", "pprint.py", "difflib.py")

SECTIONS = ("kernels", "pretrain", "data", "posttrain", "generation", "scaling")


@dataclass(frozen=True)
class Size:
    """What one demo size trains and measures."""

    data: str  # "slice" (QUICK_SLICE) or "stdlib"
    vocab_size: int
    model: dict  # TransformerConfig overrides of the "tiny" preset
    draft: dict  # the small draft model trained alongside
    steps: int
    batch_size: int
    seq_len: int
    sft_steps: int
    dpo_steps: int
    post_seq_len: int
    new_tokens: int  # generation section
    kernel_linear: tuple[int, int]  # (K, N) of the BFP linear case
    kernel_attention: tuple[int, int, int]  # (heads, seq, head_dim)
    kernel_decode_ctx: int
    val_fraction: float = 0.05  # share of files held out, the same in every section
    scaling_grid: dict | None = None  # starts of the Chinchilla fit (None: the full grid)


SIZES = {
    "quick": Size("slice", 512, {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                 "ffn_dim": 176, "max_seq_len": 512},
                  {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 96,
                   "max_seq_len": 512},
                  steps=150, batch_size=8, seq_len=128, sft_steps=30, dpo_steps=40,
                  post_seq_len=512, new_tokens=48, kernel_linear=(1024, 1024),
                  kernel_attention=(4, 256, 64), kernel_decode_ctx=1024, val_fraction=0.2,
                  # 36 starts instead of 4,500: the same optimum on this data, 10x sooner
                  scaling_grid={"alpha": (0.5,), "beta": (0.5,), "e": (0.5,)}),
    "full": Size("stdlib", 2048, {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                                  "ffn_dim": 352, "max_seq_len": 1024},
                 {"dim": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 176,
                  "max_seq_len": 1024},
                 steps=300, batch_size=16, seq_len=256, sft_steps=60, dpo_steps=60,
                 post_seq_len=512, new_tokens=96, kernel_linear=(4096, 4096),
                 kernel_attention=(8, 1024, 64), kernel_decode_ctx=4096),
    # `llmcore demo` on a CUDA device: the same sections, a model 30x larger
    "gpu": Size("stdlib", 8192, {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4,
                                 "ffn_dim": 1408, "max_seq_len": 1024},
                {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 352,
                 "max_seq_len": 1024},
                steps=1000, batch_size=32, seq_len=512, sft_steps=200, dpo_steps=200,
                post_seq_len=1024, new_tokens=128, kernel_linear=(4096, 4096),
                kernel_attention=(16, 2048, 128), kernel_decode_ctx=16384),
}


def _slice_paths() -> list[str]:
    from llmcore.data.corpus import stdlib_root

    root = stdlib_root()
    paths = [str(root / name) for name in QUICK_SLICE if (root / name).exists()]
    if not paths:
        raise FileNotFoundError(f"none of the demo's stdlib files were found under {root}")
    return paths


class Demo:
    """One demo run into ``out``. ``run()`` goes through :data:`SECTIONS` in order; each
    section writes ``out/<section>.json`` and returns the dict it wrote."""

    def __init__(self, out: str | os.PathLike, quick: bool = False, device=None,
                 preference: str = "dpo", sections=SECTIONS, progress: bool = True,
                 echo: Callable[[str], object] = print):
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown demo section(s) {unknown}; available: {list(SECTIONS)}")
        if preference not in ("dpo", "ipo", "slic", "hinge"):
            raise ValueError(f"preference must be dpo, ipo, slic or hinge, got {preference!r}")
        self.out = Path(out)
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quick = quick
        self.size = SIZES["quick" if quick else "gpu" if self.device.type == "cuda" else "full"]
        self.preference, self.sections = preference, list(sections)
        self.progress, self.echo = progress, echo
        self.results: dict[str, dict] = {}
        self.pngs: dict[str, list[str]] = {}

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        todo = [s for s in SECTIONS if s in self.sections]
        for i, name in enumerate(todo, 1):
            self.echo(f"\n[{i}/{len(todo)}] {name}")
            t = time.perf_counter()
            res = getattr(self, f"section_{name}")()
            res["seconds"] = time.perf_counter() - t
            self.results[name] = res
            self._write(f"{name}.json", res)
            self.echo(f"  ({res['seconds']:.0f} s)")
        summary = {"quick": self.quick, "device": str(self.device), "sections": todo,
                   "seconds": time.perf_counter() - t0, "machine": _machine(),
                   "headline": self.headline()}
        self._write("summary.json", summary)
        write_index(self.out, summary, self.results, self.pngs)
        return summary

    def _write(self, name: str, obj) -> None:
        path = self.out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)

    def _plot(self, section: str, name: str, draw) -> None:
        """Draw with matplotlib into ``out/<name>.png``; skipped without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig = draw(plt)
        path = self.out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.pngs.setdefault(section, []).append(path.name)

    def _need_model(self, name: str) -> Path:
        path = self.out / "runs" / name / "final"
        if not (path / "model.safetensors").is_file():
            raise ValueError(f"{path} not found: this section starts from the pretrain "
                             "section's models; run the pretrain section into the same --out")
        return path

    def _data(self):
        return "stdlib" if self.size.data == "stdlib" else _slice_paths()

    # -- 1. kernels ------------------------------------------------------------------------
    def section_kernels(self) -> dict:
        checks = check_kernels(self.device, seed=int(time.time()) & 0xFFFF)
        for c in checks:
            self.echo(f"  {'ok ' if c['ok'] else 'BAD'} {c['op']:<34} max error {c['error']:.2e}"
                      f" (tolerance {c['tolerance']:.0e})")
        bad = [c["op"] for c in checks if not c["ok"]]
        if bad:
            raise RuntimeError(f"kernel check failed: {bad} (see {self.out}/kernels.json)")
        speed = time_kernels(self.device, self.size)
        self.echo(f"  {'case':<44} {'llmcore ms':>10} {'baseline ms':>11} {'speed-up':>8}")
        for r in speed:
            self.echo(f"  {r['case']:<44} {r['ms']:10.3f} {r['baseline_ms']:11.3f} "
                      f"{r['speedup']:7.2f}x  vs {r['baseline']}")

        def draw(plt):
            fig, ax = plt.subplots(figsize=(7, 2.8))
            ax.barh([r["case"] for r in speed], [r["speedup"] for r in speed])
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set(xlabel="speed-up over the PyTorch baseline", title="Kernels")
            return fig

        self._plot("kernels", "kernels", draw)
        return {"checks": checks, "speed": speed}

    # -- 2. pretraining --------------------------------------------------------------------
    def _pretrain(self, name: str, model: dict, **over) -> dict:
        from llmcore.training.config import TrainConfig
        from llmcore.training.recipes import RECIPES

        s = self.size
        cfg = TrainConfig(recipe="pretrain", preset="tiny", data=self._data(),
                          vocab_size=s.vocab_size, model=dict(model), steps=s.steps,
                          batch_size=s.batch_size, seq_len=s.seq_len, lr=3e-3, min_lr=3e-4,
                          warmup=max(1, s.steps // 10), schedule="wsd",
                          eval_every=max(1, s.steps // 3), eval_tokens=16384,
                          sample_tokens=48, tensorboard=False, progress=self.progress,
                          val_fraction=s.val_fraction, **over).validate()
        run = self.out / "runs" / name
        if (run / "summary.json").is_file():  # a rerun into the same folder keeps it
            return json.loads((run / "summary.json").read_text())
        RECIPES["pretrain"].run(cfg, run)
        return json.loads((run / "summary.json").read_text())

    def section_pretrain(self) -> dict:
        runs = {}
        for name, over in (("fp32", {}), ("mxint8", {"bfp": "mxint8"})):
            self.echo(f"  training the {name} model")
            runs[name] = self._pretrain(name, self.size.model, **over)
        self.echo("  training the draft model (for assisted generation)")
        runs["draft"] = self._pretrain("draft", self.size.draft)
        xz = runs["fp32"]["xz_9e"]["bpb"]
        table = {k: {"params": v["params"], "tokens": v["tokens"],
                     "tokens_per_s": v["tokens_per_s_median"], "val_bpb": v["val"]["val_bpb"],
                     "val_loss": v["val"]["val_loss"]} for k, v in runs.items()}
        for k, v in table.items():
            self.echo(f"  {k:<7} {v['params']:>9,} params  {v['tokens_per_s']:>9,.0f} tokens/s  "
                      f"held-out {v['val_bpb']:.3f} bits/byte (xz -9e: {xz:.3f})")
        sample = _last_sample(self.out / "runs" / "fp32")
        if sample:
            self.echo("  sample (fp32 model, prompt 'def '):\n    "
                      + sample[:240].replace("\n", "\n    "))

        def draw(plt):
            fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
            for k in ("fp32", "mxint8", "draft"):
                rows = _metrics(self.out / "runs" / k)
                t = [r for r in rows if "loss" in r and r.get("split") != "val"]
                ax[0].plot([r["step"] for r in t], _smooth([r["loss"] for r in t]), label=k)
            ax[0].set(xlabel="step", ylabel="train loss (nats/token)", title="Pretraining")
            ax[0].legend()
            names = list(table)
            ax[1].bar(names + ["xz -9e"], [table[k]["val_bpb"] for k in names] + [xz],
                      color=["C0", "C1", "C2", "0.6"])
            ax[1].set(ylabel="held-out bits per byte", title="Lower is better")
            return fig

        self._plot("pretrain", "pretrain", draw)
        return {"runs": table, "xz_bpb": xz, "sample": sample,
                "mxint8_vs_fp32_tokens_per_s": table["mxint8"]["tokens_per_s"]
                / table["fp32"]["tokens_per_s"]}

    # -- 3. data ---------------------------------------------------------------------------
    def section_data(self) -> dict:
        from llmcore.data.clean import DEFAULT_STEPS, clean_corpus, format_report

        rep = clean_corpus(self._data(), self.out / "data" / "clean", DEFAULT_STEPS,
                           workers=min(2, os.cpu_count() or 1))
        self.echo("  " + format_report(rep).replace("\n", "\n  "))
        return rep

    # -- 4. post-training ------------------------------------------------------------------
    def _tasks(self, kind: str) -> Path:
        if self.size.data == "stdlib":
            from llmcore.data.prepare import ensure_stdlib_task

            return ensure_stdlib_task(kind, self.size.val_fraction, progress=self.progress)
        from llmcore.data import stdlib_tasks

        out = self.out / "data" / f"{kind}-slice"
        if not (out / "stats.json").is_file():
            write = stdlib_tasks.write_sft_stdlib if kind == "sft" else \
                stdlib_tasks.write_preferences_stdlib
            write(out, val_fraction=self.size.val_fraction,
                  include=[n if n.endswith(".py") else n + "/" for n in QUICK_SLICE])
        return out

    def _post(self, recipe: str, name: str, data: Path, init: Path, steps: int, **over) -> dict:
        from llmcore.training.config import TrainConfig
        from llmcore.training.recipes import RECIPES

        run = self.out / "runs" / name
        if (run / "summary.json").is_file():
            return json.loads((run / "summary.json").read_text())
        cfg = TrainConfig(recipe=recipe, init_from=str(init), data=str(data), steps=steps,
                          batch_size=4, seq_len=self.size.post_seq_len, lr=1e-3 if recipe ==
                          "sft" else 5e-4, min_lr=1e-4 if recipe == "sft" else 5e-5,
                          warmup=max(1, steps // 10), weight_decay=0.0,
                          eval_every=steps, eval_before=True, eval_rows=256,
                          skip_bad_rows=True, tensorboard=False, sample_tokens=0,
                          progress=self.progress, **over).validate()
        RECIPES[recipe].run(cfg, run)
        return json.loads((run / "summary.json").read_text())

    def section_posttrain(self) -> dict:
        base = self._need_model("fp32")
        self.echo("  SFT on the stdlib instruction set")
        sft = self._post("sft", "sft", self._tasks("sft"), base, self.size.sft_steps)
        self.echo(f"  {self.preference.upper()} on the stdlib preference pairs")
        pref = self._post("dpo", self.preference, self._tasks("preference"),
                          self.out / "runs" / "sft" / "final", self.size.dpo_steps,
                          loss_type=self.preference, beta=0.1)
        acc_b = pref["before"]["val_logps/accuracies"]
        acc_a = pref["after"]["val_logps/accuracies"]
        implicit = pref["after"].get("val_rewards/accuracies")
        self.echo(f"  SFT held-out answer loss {sft['before']['val_loss']:.3f} -> "
                  f"{sft['after']['val_loss']:.3f}")
        self.echo(f"  {self.preference} held-out pairs with log P(chosen) > log P(rejected): "
                  f"{acc_b:.3f} -> {acc_a:.3f}"
                  + ("" if implicit is None else f"; implicit-reward accuracy {implicit:.3f}"))

        def draw(plt):
            fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
            ax[0].bar(["before", "after"], [sft["before"]["val_loss"], sft["after"]["val_loss"]])
            ax[0].set(title="SFT: held-out answer loss", ylabel="nats/token")
            ax[1].bar(["before", "after"], [acc_b, acc_a], color="C1")
            ax[1].axhline(0.5, color="k", lw=0.8)
            ax[1].set(title=f"{self.preference}: held-out preference accuracy", ylim=(0, 1))
            return fig

        self._plot("posttrain", "posttrain", draw)
        return {"sft": {"before": sft["before"], "after": sft["after"], "data": sft["data"]},
                self.preference: {"before": pref["before"], "after": pref["after"],
                                  "data": pref["data"]},
                "preference_accuracy": {"before": acc_b, "after": acc_a},
                "implicit_reward_accuracy": implicit}

    # -- 5. generation ---------------------------------------------------------------------
    def section_generation(self) -> dict:
        from llmcore.generation import assisted_generate, generate, self_draft
        from llmcore.models import Transformer
        from llmcore.tokenizer import load_tokenizer

        runs = self.out / "runs"
        for name in ("fp32", "draft"):
            self._need_model(name)
        target = Transformer.from_pretrained(str(runs / "fp32" / "final"),
                                             device=self.device).eval()
        draft = Transformer.from_pretrained(str(runs / "draft" / "final"),
                                            device=self.device).eval()
        tok = load_tokenizer(str(runs / "fp32" / "final"))
        prompt = _heldout_prompt(self._data(), tok, 96, self.size.val_fraction)
        ids = torch.tensor([prompt], device=self.device)
        n = self.size.new_tokens
        with torch.no_grad():
            generate(target, ids, 4)  # warm-up
            t = time.perf_counter()
            plain = generate(target, ids, n)
            plain_s = time.perf_counter() - t
            rows = [{"method": "plain greedy", "tokens_per_s": n / plain_s, "speedup": 1.0,
                     "acceptance": None, "identical": True}]
            for name, d in (("draft model (trained)", draft),
                            ("MXINT4 self-draft", self_draft(target, "mxint4")),
                            ("prompt lookup", "prompt_lookup")):
                out, st = assisted_generate(target, d, ids, n)
                same = bool(torch.equal(out, plain))
                rows.append({"method": name, "tokens_per_s": st.new_tokens / st.elapsed_s,
                             "speedup": plain_s / st.elapsed_s * st.new_tokens / n,
                             "acceptance": st.accepted / max(st.drafted, 1),
                             "identical": same})
        for r in rows:
            acc = "" if r["acceptance"] is None else f"acceptance {r['acceptance']:.2f}"
            self.echo(f"  {r['method']:<24} {r['tokens_per_s']:8.1f} tokens/s  "
                      f"{r['speedup']:5.2f}x  {acc:<17} identical to greedy: {r['identical']}")
        if not all(r["identical"] for r in rows):
            raise RuntimeError("assisted generation did not reproduce the greedy output")
        if max(r["speedup"] for r in _assisted_rows(rows)) < 1.0:
            self.echo("  plain greedy runs its whole loop in one op (Transformer.decode_greedy); "
                      "assisted generation pays Python for every draft-and-verify round, "
                      "which at this model size costs more than the target steps it saves")

        def draw(plt):
            fig, ax = plt.subplots(figsize=(7, 2.8))
            ax.barh([r["method"] for r in rows], [r["tokens_per_s"] for r in rows])
            ax.set(xlabel="tokens/s (batch 1, greedy)", title="Plain vs assisted generation")
            return fig

        self._plot("generation", "generation", draw)
        return {"prompt_tokens": len(prompt), "new_tokens": n, "rows": rows,
                "text": tok.decode(plain[0, len(prompt):].tolist())}

    # -- 6. scaling ------------------------------------------------------------------------
    def section_scaling(self) -> dict:
        from llmcore.scaling.chinchilla import EPOCH_CSV, fit_chinchilla, plan, read_runs

        N, D, L = read_runs(EPOCH_CSV, exclude_highest=5)
        fit = fit_chinchilla(N, D, L, grid=self.size.scaling_grid)
        law = fit.to_dict()
        pre = self.results.get("pretrain", {}).get("runs", {}).get("fp32")
        if pre is None:
            pre_path = self.out / "pretrain.json"
            pre = json.loads(pre_path.read_text())["runs"]["fp32"] if pre_path.is_file() \
                else None
        if pre is not None:  # FLOP/s this machine sustained in the pretraining section
            flops = 6.0 * pre["params"] * pre["tokens_per_s"]
            source = "the pretraining section's fp32 run"
        else:
            flops, source = _measure_flops(self.device), "a matmul measured now"
        day = flops * 86400.0
        p = plan(fit, day, tokens_per_param=(150.0,))
        self.echo(f"  fit on {len(N)} Chinchilla runs (Epoch AI's data): E={law['E']:.3f} "
                  f"A={law['A']:.1f} B={law['B']:.1f} alpha={law['alpha']:.3f} "
                  f"beta={law['beta']:.3f}")
        self.echo(f"  this machine: {flops / 1e9:.2f} GFLOP/s of training ({source}), "
                  f"{day:.2e} FLOPs a day")
        self.echo(f"  a day's compute-optimal model: {p['N_opt']:.3g} parameters on "
                  f"{p['D_opt']:.3g} tokens ({p['tokens_per_param']:.1f} tokens/parameter)")

        def draw(plt):
            fig, ax = plt.subplots(figsize=(6, 3.6))
            ns = torch.logspace(math.log10(p["N_opt"]) - 1.5, math.log10(p["N_opt"]) + 1.5, 60)
            ax.plot(ns, [fit.predict(float(n), day / (6 * float(n))) for n in ns])
            ax.axvline(p["N_opt"], color="k", lw=0.8, ls="--", label="compute-optimal")
            ax.set(xscale="log", xlabel="parameters", ylabel="predicted loss",
                   title=f"One day of this machine ({day:.1e} FLOPs)")
            ax.legend()
            return fig

        self._plot("scaling", "scaling", draw)
        return {"law": law, "runs": len(N), "flops_per_s": flops, "flops_source": source,
                "day_flops": day, "plan": p}

    # -- summary ---------------------------------------------------------------------------
    def headline(self) -> list[str]:
        r, out = self.results, []
        if "kernels" in r:
            out.append(f"kernels: {len(r['kernels']['checks'])} checks passed; " + ", ".join(
                f"{s['op']} {s['speedup']:.2f}x" for s in r["kernels"]["speed"]))
        if "pretrain" in r:
            t = r["pretrain"]["runs"]
            out.append(f"pretraining: held-out {t['fp32']['val_bpb']:.3f} (fp32) / "
                       f"{t['mxint8']['val_bpb']:.3f} (mxint8) bits/byte vs xz "
                       f"{r['pretrain']['xz_bpb']:.3f}")
        if "data" in r:
            d = r["data"]
            removed = {st["step"]: st["removed"] for st in d["steps"]}
            out.append(f"data: cleaning kept {d['documents']['out']:,} of "
                       f"{d['documents']['in']:,} documents ({removed.get('exact_dedup', 0)} "
                       f"exact and {removed.get('near_dedup', 0)} near duplicates removed)")
        if "posttrain" in r:
            a = r["posttrain"]["preference_accuracy"]
            out.append(f"post-training: {self.preference} preference accuracy "
                       f"{a['before']:.3f} -> {a['after']:.3f}")
        if "generation" in r:
            best = max(_assisted_rows(r["generation"]["rows"]), key=lambda x: x["speedup"])
            out.append(f"generation: best assisted {best['method']} {best['speedup']:.2f}x "
                       "plain greedy, outputs identical to greedy")
        if "scaling" in r:
            p = r["scaling"]["plan"]
            out.append(f"scaling: a day here trains {p['N_opt']:.2g} parameters on "
                       f"{p['D_opt']:.2g} tokens")
        return out


def _assisted_rows(rows: list[dict]) -> list[dict]:
    """The generation section's assisted rows (plain greedy, the baseline, has no acceptance)."""
    return [r for r in rows if r["acceptance"] is not None]


# ---------------------------------------------------------------------------------------
# kernels

def check_kernels(device: torch.device, seed: int = 0) -> list[dict]:
    """Each op against its float64 reference on fresh random inputs of odd sizes:
    [{"op", "error", "tolerance", "ok"}]."""
    from llmcore import ops
    from llmcore import reference as ref

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    out = []

    def record(op, got, want, tol):
        err = (got.double() - want.double()).abs().max().item() / max(
            want.double().abs().max().item(), 1e-30)
        out.append({"op": op, "error": err, "tolerance": tol, "ok": bool(err <= tol)})

    x, w = rnd(5, 96), rnd(33, 96)
    for fmt in ("mxint8", "mxint4"):
        q = ops.bfp_quantize(w, fmt)
        deq = ops.bfp_dequantize(q)
        f = q.format
        m, e = ref.bfp_quantize(w.cpu(), f.mantissa_bits, f.block_size)
        want = ref.bfp_dequantize(m, e, f.mantissa_bits, f.block_size, w.shape[-1],
                                  torch.float64)
        record(f"bfp_quantize {fmt}", deq.cpu(), want, 0.0)
        record(f"bfp_linear {fmt} (M=5, K=96, N=33)", ops.bfp_linear(x, q).cpu(),
               x.double().cpu() @ want.double().T, 1e-5)
    q, k, v = rnd(2, 77, 4, 64), rnd(2, 77, 2, 64), rnd(2, 77, 2, 64)
    want = ref.attention_fwd(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)[0]
    record("attention causal GQA (77 tokens)", ops.attention(q, k, v, causal=True).cpu(),
           want, 1e-4)
    b, ctx, hkv, d = 2, 53, 2, 64
    kc, vc = rnd(b, 64, hkv, d), rnd(b, 64, hkv, d)
    qd = rnd(b, 1, 4, d)
    lens = torch.tensor([ctx, 17], dtype=torch.int32, device=device)
    got = ops.decode_attention(qd, kc, vc, lens)
    want = ref.decode_attention(qd.double().cpu(), kc.double().cpu(), vc.double().cpu(),
                                lens.cpu(), 1 / math.sqrt(d))[0]
    record("decode_attention (lengths 53, 17)", got.cpu(), want, 1e-4)
    return out


def time_kernels(device: torch.device, size: Size) -> list[dict]:
    """One case per kernel family against its PyTorch baseline, timed in this run by the
    bench suites' own cases."""
    from llmcore.bench import attention as ba
    from llmcore.bench import bfp as bb
    from llmcore.bench import decode as bd
    from llmcore.bench.common import add_ratios

    k, n = size.kernel_linear
    rows = bb.run_linear(device, [1], [(k, n)])
    h, s, d = size.kernel_attention
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    att = ba.run_case(device, 1, h, s, d, True, dtype, with_backward=False)
    dec = bd.run_case(device, 1, size.kernel_decode_ctx, bd.cache_dtype(device))
    add_ratios(att, [ba.BASELINE])
    add_ratios(dec, bd.BASELINES)
    out = []
    for label, group, want in (("BFP linear mxint8, decode M=1", rows, "mxint8"),
                               ("attention causal fwd", att, "llmcore"),
                               ("decode attention", dec, "llmcore")):
        ours = [r for r in group if want in r.method and "llmcore" in r.method and r.ratios]
        if not ours:
            continue
        r = ours[0]
        base, ratio = next(iter(r.ratios.items()))
        base_ms = r.ms * ratio
        out.append({"op": label.split(",")[0], "case": f"{label} ({r.case})",
                    "method": r.method, "ms": r.ms, "baseline": base, "baseline_ms": base_ms,
                    "speedup": ratio})
    return out


# ---------------------------------------------------------------------------------------
# helpers

def _machine() -> dict:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def _last_sample(run: Path) -> str:
    f = run / "samples.jsonl"
    if not f.is_file():
        return ""
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return rows[-1].get("text", "") if rows else ""


def _heldout_prompt(data, tok, n: int, val_fraction: float) -> list[int]:
    """The first ``n`` tokens of the first held-out document: a prompt the model never
    trained on, with real code after it."""
    from llmcore.data.corpus import iter_documents

    for doc in iter_documents(data, "val", val_fraction):
        ids = tok.encode(doc.text, add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n]
    raise ValueError("no held-out document is long enough for a generation prompt")


def _measure_flops(device: torch.device) -> float:
    a = torch.randn(512, 512, device=device)
    for _ in range(3):
        a @ a
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 512 ** 3 * reps / (time.perf_counter() - t) / 3  # training ~ 3 matmuls/weight


# ---------------------------------------------------------------------------------------
# index.html

def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_index(out: Path, summary: dict, results: dict, pngs: dict) -> Path:
    """``out/index.html``: the headline, then per section its table, plot and JSON link."""
    parts = ["<!doctype html><meta charset='utf-8'><title>llmcore demo</title>",
             "<style>body{font:14px system-ui,sans-serif;max-width:980px;margin:2em auto}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:2px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:.5em;overflow:auto}</style>",
             f"<h1>llmcore demo</h1><p>{'quick' if summary['quick'] else 'full'} run on "
             f"{html.escape(summary['device'])}, {summary['seconds']:.0f} s; "
             f"{html.escape(json.dumps(summary['machine']))}</p><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in summary["headline"]]
    parts.append("</ul>")
    for name, res in results.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if name == "kernels":
            parts.append(_table(res["checks"], ["op", "error", "tolerance", "ok"]))
            parts.append(_table(res["speed"], ["case", "ms", "baseline", "baseline_ms",
                                               "speedup"]))
        elif name == "pretrain":
            rows = [{"model": k, **v} for k, v in res["runs"].items()]
            rows.append({"model": "xz -9e", "val_bpb": res["xz_bpb"]})
            parts.append(_table(rows, ["model", "params", "tokens", "tokens_per_s",
                                       "val_loss", "val_bpb"]))
            if res.get("sample"):
                parts.append(f"<pre>{html.escape(res['sample'])}</pre>")
        elif name == "data":
            rows = [{**st, "why / what": ", ".join(f"{k} {v:,}" for k, v in
                                                   {**st["reasons"], **st["counts"]}.items())}
                    for st in res["steps"]]
            parts.append(_table(rows, ["step", "seen", "kept", "removed", "why / what"]))
        elif name == "posttrain":
            a = res["preference_accuracy"]
            parts.append(_table([{"figure": "held-out preference accuracy", **a}],
                                ["figure", "before", "after"]))
        elif name == "generation":
            parts.append(_table(res["rows"], ["method", "tokens_per_s", "speedup",
                                              "acceptance", "identical"]))
        elif name == "scaling":
            p = res["plan"]
            parts.append(_table([{**res["law"]}], ["E", "A", "B", "alpha", "beta"]))
            parts.append(_table([{"FLOPs a day": res["day_flops"], "parameters": p["N_opt"],
                                  "tokens": p["D_opt"], "tokens/parameter":
                                  p["tokens_per_param"]}],
                                ["FLOPs a day", "parameters", "tokens", "tokens/parameter"]))
        for png in pngs.get(name, []):
            parts.append(f"<p><img src='{html.escape(png)}' alt='{html.escape(name)}'></p>")
        parts.append(f"<p><a href='{name}.json'>{name}.json</a> "
                     f"({res.get('seconds', 0):.0f} s)</p>")
    path = out / "index.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


__all__ = ["Demo", "QUICK_SLICE", "SECTIONS", "SIZES", "Size", "check_kernels",
           "time_kernels", "write_index"]
