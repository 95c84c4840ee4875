"""`llmcore bench vs-llamacpp`: llmcore beside llama.cpp on the same checkpoint
(docs/benchmarks.md).

A Llama-shaped checkpoint with random weights (or the user's, ``model_dir``) is loaded by
llmcore and converted to GGUF for llama.cpp (its ``convert_hf_to_gguf.py``, or this
module's own GGUF writer when the converter is missing or refuses the checkpoint), then
quantised with ``llama-quantize``. Format pairs (the same bits per weight):

  llmcore mxint8 / Q8_0   llmcore mxint4 / Q4_0   llmcore bf16 / BF16   llmcore fp32 / F32

Per (model, pair, threads), batch 1:
  decode    greedy decode of N tokens after a P-token prompt in a KV cache (llama-bench:
            ``-n N -d P``; llmcore: ``Transformer.decode_greedy``, the loop ``generate``
            runs), tokens/s, and the weight bandwidth it implies: bytes of weights
            read per token (every weight once, the input embedding only when it is the
            head too) x tokens/s
  prefill   P tokens into an empty cache (``-p P``), tokens/s
  verify    V new tokens at once after the P-token prompt (``-p V -d P``; llmcore: one
            cached forward call of V tokens, the call that scores V - 1 drafts in assisted
            generation, rolled back each time), as its cost in single-token decode steps:
            (ms of the call) / (ms per decoded token). llmcore computes the logits of all
            V positions (assisted generation needs them), llama.cpp only the last one's
            (llama-bench's batch), so its figure is a lower bound of a real verification
  (the KV cache holds 16 bits per element on both sides: llama.cpp's default F16 cache,
  llmcore's ``storage="float16"`` for an fp32 model, its own dtype for a bf16 one)
  memory    peak resident set of a fresh process that loaded the model and ran one token
            (llmcore: Python + torch included; llama.cpp: llama-bench, weights mmapped)
The engines alternate (llmcore, llama.cpp, llmcore, ...) for ``rounds`` rounds, each
round one timed run of every test (after a warm-up: llama-bench's own in every round,
llmcore's in the first, its model staying loaded); the rows report medians. Threads:
``torch.set_num_threads`` for llmcore (its kernels use at::parallel_for), ``-t`` for
llama.cpp.

llama.cpp is found from ``llamacpp`` (a build folder or install prefix holding
``llama-bench`` and ``llama-quantize``), ``$LLMCORE_LLAMACPP``, or the ``llama_cpp`` Python
package (llama-cpp-python, timed through its binding); with none of them the suite is
skipped with a message saying how to get one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcore.bench.common import Row, add_ratios, progress_bar
from llmcore.bench.generate import weight_bytes
from llmcore.ops.fused import argmax

# Random-weight shapes. 110M: a Llama-2-style small model (vocab 32000, tied); 1B: the
# Llama-3.2-1B shape (vocab 128256, tied embeddings, llama3 RoPE scaling).
SHAPES = {
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                 vocab_size=32000, tie_embeddings=True, max_seq_len=2048),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
               vocab_size=128256, tie_embeddings=True, max_seq_len=8192, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
}
# pair -> (llmcore dtype, llmcore quantize, GGUF type)
PAIRS = {
    "mxint8": (torch.float32, "mxint8", "Q8_0"),
    "mxint4": (torch.float32, "mxint4", "Q4_0"),
    "bf16": (torch.bfloat16, None, "BF16"),
    "fp32": (torch.float32, None, "F32"),
}
DEFAULT_PLAN = {"110M": ["mxint8", "mxint4", "bf16", "fp32"], "1B": ["mxint8", "mxint4"]}
BASELINES = ["llama.cpp"]
SKIP_MESSAGE = (
    "llama.cpp not found: pass --llamacpp DIR (a llama.cpp build folder or install prefix "
    "holding llama-bench and llama-quantize) or set LLMCORE_LLAMACPP=DIR, or install the "
    "Python package (pip install llama-cpp-python). To build llama.cpp: git clone "
    "https://github.com/ggml-org/llama.cpp && cmake -S llama.cpp -B llama.cpp/build "
    "-DCMAKE_BUILD_TYPE=Release && cmake --build llama.cpp/build -j --target llama-bench "
    "llama-quantize")


@dataclass
class Settings:
    """What is measured: decode ``decode`` tokens after a ``prompt``-token prompt, prefill
    each of ``prefill`` tokens, ``rounds`` interleaved rounds at each thread count."""

    prompt: int = 128
    decode: int = 64
    prefill: tuple[int, ...] = (128, 512)
    threads: tuple[int, ...] = (1, 2)
    rounds: int = 3
    verify: int = 5  # tokens of one verification call (gamma = 4 drafts); 0: not measured
    verify_reps: int = 8  # timed calls per round (a median)
    prefill_reps: int = 3  # timed prefills per round and engine (a median): one run alone
    # moved a row by up to 0.9x on a shared machine

    @classmethod
    def quick(cls, threads=(1, 2)) -> Settings:
        return cls(prompt=64, decode=16, prefill=(64,), threads=tuple(threads), rounds=1,
                   prefill_reps=1)


# ---------------------------------------------------------------------------------------
# Finding llama.cpp
# ---------------------------------------------------------------------------------------
@dataclass
class LlamaCpp:
    """A llama.cpp to measure: ``kind`` "build" (the ``llama-bench`` / ``llama-quantize``
    programs) or "python" (the llama_cpp package's binding); ``source`` is the source
    tree when known (its ``convert_hf_to_gguf.py`` is the default converter)."""

    kind: str
    bench: str | None = None
    quantize: str | None = None
    source: str | None = None
    info: dict = field(default_factory=dict)


def _program(folder: Path, name: str) -> Path | None:
    for sub in ("", "bin", "build/bin"):
        p = folder / sub / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _source_root(start: Path) -> str | None:
    """The llama.cpp source tree at or above ``start`` (up to 3 levels), if any."""
    for d in [start, *list(start.resolve().parents)[:3]]:
        if (d / "convert_hf_to_gguf.py").is_file():
            return str(d)
    return None


def find_llamacpp(path: str | None = None, env=os.environ) -> LlamaCpp | None:
    """The llama.cpp given by ``path`` or ``$LLMCORE_LLAMACPP`` (ValueError when that
    folder has no llama-bench), else the ``llama_cpp`` Python package, else None."""
    given = path or env.get("LLMCORE_LLAMACPP")
    if given:
        folder = Path(given).expanduser()
        bench = _program(folder, "llama-bench")
        if bench is None:
            where = "--llamacpp" if path else "LLMCORE_LLAMACPP"
            raise ValueError(f"{where}={given}: no llama-bench in it (nor in its bin/ or "
                             f"build/bin/); build llama.cpp with the llama-bench and "
                             f"llama-quantize targets")
        quant = _program(bench.parent, "llama-quantize") or _program(folder, "llama-quantize")
        return LlamaCpp("build", str(bench), str(quant) if quant else None,
                        _source_root(folder))
    if importlib.util.find_spec("llama_cpp") is not None:
        return LlamaCpp("python")
    return None


def find_converter(lc: LlamaCpp, converter: str | None = None) -> str | None:
    """``converter`` (checked to exist), else the one in llama.cpp's source tree."""
    if converter:
        if not Path(converter).is_file():
            raise ValueError(f"--converter {converter}: no such file")
        return converter
    if lc.source and (Path(lc.source) / "convert_hf_to_gguf.py").is_file():
        return str(Path(lc.source) / "convert_hf_to_gguf.py")
    return None


# ---------------------------------------------------------------------------------------
# Checkpoints: llmcore writes them, llama.cpp gets them as GGUF
# ---------------------------------------------------------------------------------------
def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A Llama-style byte-fallback BPE tokenizer.json with exactly ``vocab_size`` tokens
    (<unk>, <s>, </s>, the 256 byte tokens, then placeholders): the converter needs a
    tokenizer whose size matches the embedding; the timings do not depend on it."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({f"\u2581t{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))


def write_checkpoint(shape: str, folder: Path) -> Path:
    """A random-weight (normal, std 0.02) bf16 checkpoint of ``SHAPES[shape]`` with its
    tokenizer, written by ``save_pretrained`` (kept: an existing one is reused)."""
    from llmcore.models import Transformer, TransformerConfig

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    cfg = TransformerConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    model._tie_and_rope()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    write_tokenizer(tmp, cfg.vocab_size)
    os.replace(tmp, folder)
    return folder


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs
    (the converter's ``LlamaModel.permute``)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` tensor for llama3 RoPE scaling (as the converter)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for a Hugging Face Llama tensor name."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")  # model.layers.<i>.<module...>.weight|bias
    if parts[:2] != ["model", "layers"]:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(model_dir: str | Path, path: str | Path, outtype: str = "f32") -> None:
    """Write a Llama checkpoint (config.json, safetensors, tokenizer.json) as a GGUF file
    with the ``gguf`` package: the fallback when llama.cpp's converter is not there or
    refuses the checkpoint. ``outtype``: "f32" or "bf16" for the matrices (norms and
    1-D tensors stay f32, as the converter does)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from llmcore.models import hf

    if outtype not in ("f32", "bf16"):
        raise ValueError(f"outtype must be 'f32' or 'bf16', got {outtype!r}")
    model_dir = Path(model_dir)
    cfg = hf.open_checkpoint(str(model_dir)).config
    if cfg.attention_bias or (cfg.extra.get("architectures") or ["LlamaForCausalLM"])[0] \
            not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise ValueError(f"{model_dir}: the GGUF writer handles Llama/Mistral checkpoints only")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32"
                    else gguf.LlamaFileType.MOSTLY_BF16)
    _add_vocab(w, model_dir, cfg.vocab_size)
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight",
                     llama3_rope_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).numpy())
    files = sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                t = f.get_tensor(name).float()
                if name.endswith("q_proj.weight"):
                    t = _permute_rope(t, cfg.n_heads)
                elif name.endswith("k_proj.weight"):
                    t = _permute_rope(t, cfg.n_kv_heads)
                if t.dim() == 1 or outtype == "f32":
                    w.add_tensor(gguf_name(name), t.numpy())
                else:
                    w.add_tensor(gguf_name(name), t.bfloat16().view(torch.int16).numpy()
                                 .view(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_vocab(w, model_dir: Path, vocab_size: int) -> None:
    """The token list of tokenizer.json (SentencePiece-style, as llama.cpp's "llama"
    tokenizer model), padded with placeholders to ``vocab_size``."""
    import gguf

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        doc = json.loads(tok_file.read_text())
        vocab = dict(doc.get("model", {}).get("vocab") or {})
        vocab.update({a["content"]: a["id"] for a in doc.get("added_tokens", [])})
        for text, i in vocab.items():
            if isinstance(i, int) and 0 <= i < vocab_size:
                tokens[i] = text
    types = [gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
             else gguf.TokenType.CONTROL if t in ("<unk>", "<s>", "</s>")
             else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * vocab_size)
    w.add_token_types(types)
    ids = {t: i for i, t in enumerate(tokens)}
    if "<s>" in ids:
        w.add_bos_token_id(ids["<s>"])
    if "</s>" in ids:
        w.add_eos_token_id(ids["</s>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _run(cmd: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1][-300:] if lines else ""


def to_gguf(model_dir: Path, work: Path, gguf_type: str, lc: LlamaCpp,
            converter: str | None) -> tuple[Path, dict]:
    """The GGUF file of ``model_dir`` in ``gguf_type`` (F32, BF16, Q8_0, Q4_0), made once in
    ``work`` and reused: F32/BF16 by the converter (or :func:`write_gguf`), Q8_0/Q4_0 by
    llama-quantize from the F32 file. Returns (path, how it was made)."""
    out = work / f"{model_dir.name}-{gguf_type}.gguf"
    how_file = out.with_suffix(".how.json")
    if out.is_file() and how_file.is_file():
        return out, json.loads(how_file.read_text())
    if gguf_type in ("F32", "BF16"):
        how = _convert(model_dir, out, gguf_type.lower(), converter)
    else:
        src, how = to_gguf(model_dir, work, "F32", lc, converter)
        how = {**how, "quantized_by": _quantize(lc, src, out, gguf_type)}
    how_file.write_text(json.dumps(how))
    return out, how


def _convert(model_dir: Path, out: Path, outtype: str, converter: str | None) -> dict:
    tmp = out.with_name(out.name + ".tmp")
    reason = "no convert_hf_to_gguf.py (give --converter PATH)"
    if converter:
        r = _run([sys.executable, converter, str(model_dir), "--outfile", str(tmp),
                  "--outtype", outtype])
        if r.returncode == 0 and tmp.is_file():
            os.replace(tmp, out)
            return {"converter": "convert_hf_to_gguf.py", "converter_path": converter}
        reason = f"convert_hf_to_gguf.py failed: {_last_line(r.stderr or r.stdout)}"
    write_gguf(model_dir, tmp, outtype)
    os.replace(tmp, out)
    return {"converter": "gguf.GGUFWriter (llmcore)", "fallback_reason": reason}


def _quantize(lc: LlamaCpp, src: Path, out: Path, gguf_type: str) -> str:
    tmp = out.with_name(out.name + ".tmp")
    if lc.quantize:
        r = _run([lc.quantize, str(src), str(tmp), gguf_type])
        if r.returncode != 0:
            raise RuntimeError(f"llama-quantize {gguf_type} failed: "
                               f"{_last_line(r.stderr or r.stdout)}")
        by = "llama-quantize"
    elif lc.kind == "python":
        r = _run([sys.executable, "-c", _PY_QUANTIZE, str(src), str(tmp), gguf_type])
        if r.returncode != 0:
            raise RuntimeError(f"llama_cpp.llama_model_quantize failed: "
                               f"{_last_line(r.stderr or r.stdout)}")
        by = "llama_cpp.llama_model_quantize"
    else:
        raise RuntimeError(f"no llama-quantize next to {lc.bench}: build its target too")
    os.replace(tmp, out)
    return by


_PY_QUANTIZE = r"""
import sys, llama_cpp
ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype[sys.argv[3]]
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""


def gguf_weight_bytes(path: str | Path) -> dict:
    """Bytes of the GGUF's tensors and those read per decoded token: all but the input
    embedding, which counts only when it is also the output head (no output.weight)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    per_token = sum(sizes.values())
    if "output.weight" in sizes:
        per_token -= sizes.get("token_embd.weight", 0)
    types = sorted({t.tensor_type.name for t in r.tensors})
    return {"total_bytes": sum(sizes.values()), "bytes_per_token": per_token,
            "tensor_types": types}


# ---------------------------------------------------------------------------------------
# llama.cpp side
# ---------------------------------------------------------------------------------------
def parse_llama_bench(text: str) -> list[dict]:
    """The records of ``llama-bench -o json`` output (a JSON list; text before it, such as
    log lines, is ignored): each with n_prompt, n_gen, n_depth, n_threads, avg_ts
    (tokens/s) and samples_ts."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON list in llama-bench output")
    recs = json.loads(text[start:])
    if not isinstance(recs, list):
        raise ValueError("llama-bench JSON is not a list")
    out = []
    for r in recs:
        missing = {"n_prompt", "n_gen", "n_threads", "avg_ts"} - set(r)
        if missing:
            raise ValueError(f"llama-bench record lacks {sorted(missing)}")
        out.append({**r, "n_depth": r.get("n_depth", 0)})
    return out


def _pick(records: list[dict], n_prompt: int, n_gen: int, n_depth: int,
          median: bool = False) -> float:
    """Tokens/s of the record of that test: its mean, or (``median``) the median of its
    samples (llama-bench's samples_ts, when there)."""
    for r in records:
        if (r["n_prompt"], r["n_gen"], r["n_depth"]) == (n_prompt, n_gen, n_depth):
            if median and r.get("samples_ts"):
                return float(statistics.median(r["samples_ts"]))
            return float(r["avg_ts"])
    raise ValueError(f"llama-bench gave no pp{n_prompt} tg{n_gen} d{n_depth} record")


_PY_BENCH = r"""
import json, sys, time, llama_cpp
path, threads, prefill, prompt, n = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
verify, reps = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (0, 0)
preps = int(sys.argv[8]) if len(sys.argv) > 8 else 1
ctx = max(prefill + [prompt + n, prompt + verify]) + 8
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=max(prefill + [prompt]), n_threads=threads, n_threads_batch=threads, verbose=False)
V = llm.n_vocab()
out = []
for p in prefill:
    toks = [(i * 7919) % (V - 3) + 3 for i in range(p)]
    samples = []
    for rep in range(preps + 1):  # a warm-up, then preps timed prefills
        llm.reset(); t0 = time.perf_counter(); llm.eval(toks)
        samples.append(p / (time.perf_counter() - t0))
    out.append({"n_prompt": p, "n_gen": 0, "n_depth": 0, "n_threads": threads,
                "avg_ts": sum(samples[1:]) / preps, "samples_ts": samples[1:]})
for rep in range(2):
    llm.reset(); llm.eval([(i * 7919) % (V - 3) + 3 for i in range(prompt)]); tok = 5
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
    dt = time.perf_counter() - t0
out.append({"n_prompt": 0, "n_gen": n, "n_depth": prompt, "n_threads": threads, "avg_ts": n / dt})
if verify:
    llm.reset(); llm.eval([(i * 7919) % (V - 3) + 3 for i in range(prompt)])
    samples = []
    for rep in range(reps + 1):  # a warm-up, then reps timed calls at the same depth
        llm.n_tokens = prompt; t0 = time.perf_counter(); llm.eval([5] * verify)
        samples.append(verify / (time.perf_counter() - t0))
    out.append({"n_prompt": verify, "n_gen": 0, "n_depth": prompt, "n_threads": threads,
                "avg_ts": sum(samples[1:]) / reps, "samples_ts": samples[1:]})
print(json.dumps(out))
"""


def _llama_bench(lc: LlamaCpp, args: list[str]) -> subprocess.CompletedProcess:
    """Run llama-bench; when it dies of a signal with weight repacking on (the AMX path
    crashes on some virtual machines), run it again, and from then on, with
    ``--repack 0``, noted in ``lc.info``."""
    r = _run([lc.bench, *args, *lc.info.get("extra_args", [])])
    if r.returncode < 0 and "extra_args" not in lc.info:
        lc.info.update(extra_args=["--repack", "0"], why=(
            f"llama-bench died of signal {-r.returncode} with weight repacking on; "
            f"measured with --repack 0 (no repacked/AMX weight layouts)"))
        r = _run([lc.bench, *args, *lc.info["extra_args"]])
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({r.returncode}): "
                           f"{_last_line(r.stderr or r.stdout)}")
    return r


def llamacpp_round(lc: LlamaCpp, gguf: Path, threads: int, s: Settings) -> dict:
    """One warm-up and one timed run of each test (each prefill: s.prefill_reps timed runs,
    the verify call: s.verify_reps, their medians): {"decode": tok/s, "prefill": {P: tok/s},
    "verify": tok/s (with s.verify), "build": ...}."""
    if lc.kind == "python":
        r = _run([sys.executable, "-c", _PY_BENCH, str(gguf), str(threads),
                  json.dumps(list(s.prefill)), str(s.prompt), str(s.decode), str(s.verify),
                  str(s.verify_reps), str(s.prefill_reps)])
        if r.returncode != 0:
            raise RuntimeError(f"llama_cpp bench failed: {_last_line(r.stderr)}")
        recs = parse_llama_bench(r.stdout)
    else:
        recs = []
        runs = [["-p", ",".join(map(str, s.prefill)), "-n", "0", "-d", "0", "-r",
                 str(s.prefill_reps)],
                ["-p", "0", "-n", str(s.decode), "-d", str(s.prompt), "-r", "1"]]
        if s.verify:
            runs.append(["-p", str(s.verify), "-n", "0", "-d", str(s.prompt),
                         "-r", str(s.verify_reps)])
        for args in runs:
            r = _llama_bench(lc, [*args, "-m", str(gguf), "-t", str(threads), "-o", "json"])
            recs += parse_llama_bench(r.stdout)
    build = {k: recs[0][k] for k in ("build_commit", "build_number", "cpu_info", "backends")
             if k in recs[0]}
    out = {"decode": _pick(recs, 0, s.decode, s.prompt),
           "prefill": {p: _pick(recs, p, 0, 0, median=True) for p in s.prefill},
           "build": build}
    if s.verify:
        out["verify"] = _pick(recs, s.verify, 0, s.prompt, median=True)
    return out


def _wait_rss(cmd: list[str]) -> tuple[int, str, float]:
    """Run ``cmd``; (exit status, stdout, peak RSS in MB) of that child alone."""
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return p.returncode, out.read(), usage.ru_maxrss / 1024  # KiB on Linux


def llamacpp_memory(lc: LlamaCpp, gguf: Path) -> dict:
    """Peak RSS (MB) of a llama.cpp process that loads the model and decodes one token."""
    if lc.kind == "python":
        cmd = [sys.executable, "-c", _PY_BENCH, str(gguf), "1", "[]", "1", "1"]
    else:
        cmd = [lc.bench, "-m", str(gguf), "-t", "1", "-r", "1", "-p", "0", "-n", "1",
               "--no-warmup", "-o", "json", *lc.info.get("extra_args", [])]
    rc, _, peak = _wait_rss(cmd)
    if rc != 0:
        raise RuntimeError(f"llama.cpp memory run exited with {rc}")
    return {"peak_rss_mb": peak}


# ---------------------------------------------------------------------------------------
# llmcore side
# ---------------------------------------------------------------------------------------
def load_llmcore(model_dir: Path, pair: str):
    from llmcore.models import Transformer

    dtype, quant, _ = PAIRS[pair]
    return Transformer.from_pretrained(str(model_dir), dtype=dtype, quantize=quant)


def kv_storage(model) -> str:
    """llmcore's KV cache for a comparison: 16 bits per element as llama.cpp's default F16
    cache (float16 for an fp32 model, the model's own dtype for a 16-bit one)."""
    return "float16" if model.dtype == torch.float32 else "native"


@torch.inference_mode()
def llmcore_round(model, threads: int, s: Settings, warmup: bool = True) -> dict:
    """One timed run of each test (batch 1, greedy decode; each prefill s.prefill_reps
    timed runs, the verify call s.verify_reps, their medians), after a warm-up of each (a
    full prefill, 4 decode steps) with ``warmup``."""
    torch.set_num_threads(threads)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    longest = max(max(s.prefill), s.prompt + s.decode + 1)
    cache = model.new_cache(1, longest, storage=kv_storage(model))
    out = {"prefill": {}}
    for p in s.prefill:
        ids = torch.randint(0, vocab, (1, p), generator=g)
        times = []
        for _ in range(s.prefill_reps + (1 if warmup else 0)):
            cache.reset()
            t0 = time.perf_counter()
            model(ids, cache=cache, prefill=True, logits_to_keep=1)  # as llama.cpp: the last
            times.append(time.perf_counter() - t0)
        out["prefill"][p] = p / statistics.median(times[1:] if warmup else times)
    prompt = torch.randint(0, vocab, (1, s.prompt), generator=g)
    for n in ([4] if warmup else []) + [s.decode]:
        cache.reset()
        tok = argmax(model(prompt, cache=cache, prefill=True, logits_to_keep=1))
        t0 = time.perf_counter()
        new = model.decode_greedy(tok, cache, n)  # n forward steps, as generate() runs them
        dt = time.perf_counter() - t0
        if new.shape[1] != n:
            raise RuntimeError(f"decode_greedy gave {new.shape[1]} tokens, not {n}")
    out["decode"] = s.decode / dt
    if s.verify:
        cache.reset()
        model(prompt, cache=cache, prefill=True, logits_to_keep=1)
        n0 = cache.lengths[0]
        ids = torch.randint(0, vocab, (1, s.verify), generator=g)
        times = []
        for _ in range(s.verify_reps + (1 if warmup else 0)):
            t0 = time.perf_counter()
            model(ids, cache=cache)  # every position's logits, as assisted generation
            times.append(time.perf_counter() - t0)
            cache.rollback(n0)
        out["verify"] = s.verify / statistics.median(times[1:] if warmup else times)
    return out


_LLMCORE_MEMORY = r"""
import json, sys
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
import torch
from llmcore.bench.llamacpp import load_llmcore
torch.set_num_threads(1)
base = kb("VmRSS:")
model = load_llmcore(sys.argv[1], sys.argv[2])
with torch.inference_mode():
    cache = model.new_cache(1, 8)
    tok = model(torch.ones(1, 1, dtype=torch.long), cache=cache, prefill=True)[:, -1:].argmax(-1)
    model(tok, cache=cache)
print(json.dumps({"rss_mb": kb("VmRSS:") / 1024, "peak_rss_mb": kb("VmHWM:") / 1024,
                  "runtime_rss_mb": base / 1024}))
"""


def llmcore_memory(model_dir: Path, pair: str) -> dict:
    """RSS (MB) of a fresh Python process after it imported torch and llmcore
    (runtime_rss_mb), loaded the model and ran one token (rss_mb), and its peak."""
    root = str(Path(__file__).resolve().parents[2])  # this llmcore, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, "-c", _LLMCORE_MEMORY, str(model_dir), pair],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"llmcore memory run failed: {_last_line(r.stderr)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Rows, summary, table
# ---------------------------------------------------------------------------------------
def make_rows(model: str, pair: str, threads: int, ours: list[dict], theirs: list[dict],
              weight_bytes: dict, verify: int = 0) -> list[Row]:
    """Rows (method "llmcore" / "llama.cpp") of one (model, pair, threads) from the rounds'
    results; each figure is the median over the rounds. With ``verify`` (V), the rounds'
    "verify" figures (tokens/s of one call of V tokens) add a row whose extra holds the
    call's cost in single-token decode steps."""
    gguf_type = PAIRS[pair][2]
    rows = []
    for method, runs, label in (("llmcore", ours, pair), ("llama.cpp", theirs, gguf_type)):
        wb = weight_bytes[method]
        tps = statistics.median(r["decode"] for r in runs)
        rows.append(Row("vs-llamacpp", f"{model} {pair}/{gguf_type} t={threads} decode", method,
                        1e3 / tps, metric=tps, unit="tok/s",
                        extra={"model": model, "pair": pair, "format": label,
                               "threads": threads, "test": "decode",
                               "samples_tps": [r["decode"] for r in runs],
                               "weight_bytes_per_token": wb, "weight_GBps": wb * tps / 1e9}))
        for p in runs[0]["prefill"]:
            tps = statistics.median(r["prefill"][p] for r in runs)
            rows.append(Row("vs-llamacpp", f"{model} {pair}/{gguf_type} t={threads} prefill {p}",
                            method, p * 1e3 / tps, metric=tps, unit="tok/s",
                            extra={"model": model, "pair": pair, "format": label,
                                   "threads": threads, "test": f"prefill {p}",
                                   "samples_tps": [r["prefill"][p] for r in runs]}))
        if verify:
            # Per round: the call's ms over that round's ms per decoded token; the median.
            cost = statistics.median(verify * r["decode"] / r["verify"] for r in runs)
            tps = statistics.median(r["verify"] for r in runs)
            rows.append(Row("vs-llamacpp", f"{model} {pair}/{gguf_type} t={threads} verify "
                            f"{verify}", method, verify * 1e3 / tps, metric=tps, unit="tok/s",
                            extra={"model": model, "pair": pair, "format": label,
                                   "threads": threads, "test": f"verify {verify}",
                                   "samples_tps": [r["verify"] for r in runs],
                                   "cost_in_decode_steps": cost}))
    add_ratios(rows, BASELINES)
    return rows


def summarize(rows: list[Row], memory: dict) -> list[dict]:
    """One dict per (model, pair, threads): tokens/s of both engines, llmcore / llama.cpp
    ratios (> 1: llmcore faster), weight GB/s, memory (``memory[(model, pair)]``) and the
    verification call's cost in decode steps (``verifyV_cost_llmcore`` / ``_llamacpp``)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        e = r.extra
        key = (e["model"], e["pair"], e["threads"])
        s = out.setdefault(key, {"model": e["model"], "pair": e["pair"],
                                 "llamacpp_type": PAIRS[e["pair"]][2], "threads": e["threads"]})
        who = "llmcore" if r.method == "llmcore" else "llamacpp"
        test = e["test"].replace(" ", "")  # decode, prefill128, ...
        s[f"{test}_{who}_tps"] = r.metric
        if "weight_GBps" in e:
            s[f"weight_GBps_{who}"] = e["weight_GBps"]
        if "cost_in_decode_steps" in e:
            s[f"{test}_cost_{who}"] = e["cost_in_decode_steps"]
    for s in out.values():
        for k in [k for k in s if k.endswith("_llmcore_tps")]:
            test = k.removesuffix("_llmcore_tps")
            theirs = s.get(f"{test}_llamacpp_tps")
            if theirs:
                s[f"{test}_ratio"] = s[k] / theirs
        mem = memory.get((s["model"], s["pair"]))
        if mem:
            s["rss_mb_llmcore"] = mem["llmcore"]["rss_mb"]
            s["rss_mb_llamacpp"] = mem["llamacpp"]["peak_rss_mb"]
            s["rss_ratio"] = s["rss_mb_llmcore"] / s["rss_mb_llamacpp"]
    return list(out.values())


def markdown_table(summary: list[dict], prefill=(128, 512), verify: int = 0) -> str:
    """The summary as a markdown table: llmcore / llama.cpp (ratio) per column; with
    ``verify`` a column of the verification call's cost in decode steps (llmcore /
    llama.cpp; lower is better)."""
    def pair(s, test, fmt="{:.1f}"):
        a, b = s.get(f"{test}_llmcore_tps"), s.get(f"{test}_llamacpp_tps")
        if a is None or b is None:
            return "-"
        return f"{fmt.format(a)} / {fmt.format(b)} ({a / b:.2f}x)"

    head = ["model", "llmcore / llama.cpp", "threads", "decode tok/s",
            *[f"prefill {p} tok/s" for p in prefill], "decode weight GB/s", "RSS MB",
            *([f"verify {verify}: decode steps"] if verify else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        gbps = (f"{s['weight_GBps_llmcore']:.1f} / {s['weight_GBps_llamacpp']:.1f}"
                if "weight_GBps_llmcore" in s and "weight_GBps_llamacpp" in s else "-")
        rss = (f"{s['rss_mb_llmcore']:.0f} / {s['rss_mb_llamacpp']:.0f} "
               f"({s['rss_ratio']:.2f}x)" if "rss_ratio" in s else "-")
        cells = [s["model"], f"{s['pair']} / {s['llamacpp_type']}", str(s["threads"]),
                 pair(s, "decode"), *[pair(s, f"prefill{p}", "{:.0f}") for p in prefill],
                 gbps, rss]
        if verify:
            a, b = (s.get(f"verify{verify}_cost_{w}") for w in ("llmcore", "llamacpp"))
            cells.append(f"{a:.2f} / {b:.2f}" if a is not None and b is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------
def parse_plan(models=None, pairs=None, model_dir=None, quick=False) -> dict[str, list[str]]:
    """{model: [pairs]}: ``models`` (names of SHAPES) and ``pairs`` (names of PAIRS) as
    lists or comma-separated text; the default plan (quick: the 110M only); ``model_dir``
    replaces the models by that checkpoint."""
    def split(x):
        return [v.strip() for v in (x.split(",") if isinstance(x, str) else x) if v.strip()]

    if pairs is not None:
        pairs = split(pairs)
        bad = [p for p in pairs if p not in PAIRS]
        if bad or not pairs:
            raise ValueError(f"unknown pair(s) {bad}; pairs: {', '.join(PAIRS)}")
    if model_dir is not None:
        if models is not None:
            raise ValueError("give --models or --model, not both")
        return {str(model_dir): pairs or list(PAIRS)}
    names = split(models) if models is not None else (["110M"] if quick else list(DEFAULT_PLAN))
    bad = [m for m in names if m not in SHAPES]
    if bad or not names:
        raise ValueError(f"unknown model(s) {bad}; models: {', '.join(SHAPES)} (or --model DIR)")
    return {m: pairs or DEFAULT_PLAN[m] for m in names}


def run(device: torch.device, quick: bool = False, progress_factory=None, *,
        llamacpp: str | None = None, converter: str | None = None, model_dir: str | None = None,
        models=None, pairs=None, threads=None, rounds: int | None = None,
        prompt: int | None = None, decode: int | None = None, prefill=None,
        verify: int | None = None, workdir: str | None = None, note: str | None = None,
        echo=print) -> dict:
    plan = parse_plan(models, pairs, model_dir, quick)
    s = Settings.quick() if quick else Settings()
    for name, value in (("threads", threads), ("rounds", rounds), ("prompt", prompt),
                        ("decode", decode), ("prefill", prefill)):
        if value:
            setattr(s, name, tuple(value) if isinstance(value, list) else value)
    if verify is not None:  # 0 turns the verification call off
        s.verify = verify
    lc = find_llamacpp(llamacpp)
    if lc is None:
        return {"rows": [], "baselines": BASELINES, "skipped": SKIP_MESSAGE,
                "text": SKIP_MESSAGE}
    conv = find_converter(lc, converter)
    work = Path(workdir or Path(tempfile.gettempdir()) / "llmcore-vs-llamacpp")
    work.mkdir(parents=True, exist_ok=True)
    echo(f"llama.cpp: {lc.bench or 'llama_cpp Python package'}; converter: {conv}; "
         f"checkpoints and GGUF files in {work} (kept for the next run)")
    load_avg = [os.getloadavg()]
    steps = sum(len(p) * (2 + len(s.threads) * s.rounds) for p in plan.values())
    pbar = progress_bar(progress_factory, steps, "bench vs-llamacpp")
    rows, memory, files, build = [], {}, {}, {}
    for model_name, model_pairs in plan.items():
        src = Path(model_name) if model_dir else write_checkpoint(model_name, work / model_name)
        name = src.name
        for pair in model_pairs:
            gguf, how = to_gguf(src, work, PAIRS[pair][2], lc, conv)
            files[f"{name} {pair}"] = {"gguf": str(gguf), **how, **gguf_weight_bytes(gguf)}
            model = load_llmcore(src, pair)
            wb = {"llmcore": weight_bytes(model),
                  "llama.cpp": files[f"{name} {pair}"]["bytes_per_token"]}
            for t in s.threads:
                ours, theirs = [], []
                for i in range(s.rounds):  # A, B, A, B: both see the same machine state
                    ours.append(llmcore_round(model, t, s, warmup=i == 0))
                    theirs.append(llamacpp_round(lc, gguf, t, s))
                    build = theirs[-1].pop("build") or build
                    pbar.update(1)
                rows += make_rows(name, pair, t, ours, theirs, wb, s.verify)
            del model
            memory[(name, pair)] = {"llmcore": llmcore_memory(src, pair),
                                    "llamacpp": llamacpp_memory(lc, gguf)}
            pbar.update(2)
    pbar.close()
    load_avg.append(os.getloadavg())
    summary = summarize(rows, memory)
    text = markdown_table(summary, s.prefill, s.verify)
    extra = {"settings": {"prompt": s.prompt, "decode": s.decode, "prefill": list(s.prefill),
                          "threads": list(s.threads), "rounds": s.rounds, "batch": 1,
                          "verify": s.verify, "verify_reps": s.verify_reps,
                          "prefill_reps": s.prefill_reps},
             "llamacpp": {"kind": lc.kind, "bench": lc.bench, "quantize": lc.quantize,
                          **lc.info, **build},
             "files": files, "summary": summary,
             "memory": [{"model": m, "pair": p, **v} for (m, p), v in memory.items()],
             "load_average_start_end": load_avg, "note": note,
             "notes": ["prefill: both engines compute the logits of the last prompt position "
                       "only (llmcore: logits_to_keep=1)",
                       "verify: one call of V new tokens after the prompt, as its ms over the "
                       "same round's ms per decoded token; llmcore computes all V positions' "
                       "logits (assisted generation needs them), llama-bench the last one's",
                       "RSS: whole process (llmcore: Python, torch and the model; "
                       "llama.cpp: llama-bench with the GGUF mmapped), after one token"]}
    return {"rows": rows, "baselines": BASELINES, "extra": extra, "text": text,
            "device": torch.device("cpu")}


def plot(res: dict, path: str) -> str | None:
    """llmcore / llama.cpp tokens/s per (model, pair), one panel per test, a bar per
    thread count (PNG; None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = res["extra"]["summary"]
    tests = ["decode", *[f"prefill{p}" for p in res["extra"]["settings"]["prefill"]]]
    groups = list(dict.fromkeys(f"{s['model']}\n{s['pair']}/{s['llamacpp_type']}"
                                for s in summary))
    threads = sorted({s["threads"] for s in summary})
    fig, axes = plt.subplots(1, len(tests), figsize=(4 + 1.2 * len(groups) * len(tests) / 2,
                                                      4.2), squeeze=False, sharey=True)
    w = 0.8 / len(threads)
    for ax, test in zip(axes[0], tests, strict=True):
        for j, t in enumerate(threads):
            vals = [next((s.get(f"{test}_ratio", 0.0) for s in summary if s["threads"] == t
                          and f"{s['model']}\n{s['pair']}/{s['llamacpp_type']}" == g), 0.0)
                    for g in groups]
            ax.bar([i + j * w for i in range(len(groups))], vals, width=w,
                   label=f"{t} thread{'s' if t > 1 else ''}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))], groups, fontsize=7)
        ax.set_title(test.replace("prefill", "prefill "), fontsize=10)
    axes[0][0].set_ylabel("llmcore tokens/s / llama.cpp tokens/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("llmcore vs llama.cpp, batch 1 (> 1: llmcore faster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
