"""Distillation data: a target model's greedy continuations of training-text prompts,
written as a token shard directory the pretrain recipe trains a draft on.

An assisted-generation draft earns its keep by predicting the *target's* greedy token,
not the corpus' next token. Training the draft on what the target itself writes (sequence-
level knowledge distillation, Kim & Rush 2016) aims it at exactly that::

    llmcore data distill --model runs/target/final --out runs/distill-data
    llmcore train pretrain --set shards='"runs/distill-data"' \
        --set tokenizer='"runs/target/final"' --set init_from='"runs/draft/final"' ...

Prompts are windows of ``prompt_tokens`` tokens inside one document of the TRAIN split
of ``data`` (tokenised with the target's tokenizer; the shards are cached like a training
run's), drawn with a seeded generator, each document chosen with weight proportional to
its number of windows. The validation split that benchmarks and evaluations hold out
(``val_fraction``, by default the target run's own) is never read, so a draft trained on
the result has not seen the held-out prompts of ``llmcore bench assisted``. Each prompt is
continued by ``new_tokens`` greedy tokens (no stop at EOS: assisted generation does not
stop either), in batches of equal-length prompts (no padding).

The output is an ``llmcore-tokens`` shard directory (:mod:`llmcore.data.shards`): every
document is one prompt followed by its continuation, then the EOS id. Token ids are kept
as generated (decoding and re-tokenising would not always give the same ids back). Its
``val`` split holds the continuations of prompts from a disjoint set of training
documents (``val_prompts`` of them), so a draft's validation loss there measures how well
it predicts the target on text neither saw held out. ``header.json`` adds a
``"distill"`` entry with the settings, the target and the source shards.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from llmcore.data.corpus import split_of
from llmcore.data.shards import FORMAT, VERSION, TokenShards, current_header
from llmcore.generation import generate

DISTILL_VERSION = 1


def target_run_config(model_dir: str | os.PathLike) -> dict:
    """The training config of the run a model directory belongs to (``RUN/final`` or
    ``RUN/checkpoints/step_N``), or {} when none lies beside it."""
    for up in ("..", os.path.join("..", "..")):
        f = Path(model_dir) / up / "config.json"
        if f.is_file():
            cfg = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(cfg, dict) and "recipe" in cfg:
                return cfg
    return {}


def document_spans(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[n, 2] int64 (start, length) of the documents of a shard split (each ends at an EOS,
    which is not counted)."""
    ends = (tokens == eos_id).nonzero().flatten().to(torch.int64)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1] + 1])
    return torch.stack([starts, ends - starts], dim=1)


def sample_prompts(tokens: torch.Tensor, spans: torch.Tensor, n: int, prompt_tokens: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``n`` windows [n, prompt_tokens] int64 of ``tokens``, each inside one of ``spans``
    (documents drawn with weight = their number of windows, then a uniform offset)."""
    windows = (spans[:, 1] - prompt_tokens + 1).clamp(min=0)
    if n == 0:
        return torch.empty(0, prompt_tokens, dtype=torch.int64)
    doc = torch.multinomial(windows.double(), n, replacement=True, generator=generator)
    offset = (torch.rand(n, generator=generator, dtype=torch.float64) *
              windows[doc].double()).floor().to(torch.int64)
    starts = spans[doc, 0] + offset
    idx = starts.unsqueeze(1) + torch.arange(prompt_tokens)
    return tokens[idx.flatten()].to(torch.int64).view(n, prompt_tokens)


def val_documents(n: int) -> torch.Tensor:
    """[n] bool: which of ``n`` documents give the validation prompts, about 1 in 20 by a
    hash of the document's index (every 20th when the hash picks none or all)."""
    is_val = torch.tensor([split_of(str(i), 0.05) == "val" for i in range(n)], dtype=torch.bool)
    if n >= 2 and (is_val.all() or not is_val.any()):
        is_val = torch.arange(n) % 20 == min(19, n - 1)
    return is_val if n >= 2 else torch.zeros(n, dtype=torch.bool)


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_args(prompts: int, prompt_tokens: int, new_tokens: int, batch_size: int,
               val_prompts: int, max_seq_len: int | None = None) -> None:
    """ValueError naming the argument for any setting out of range."""
    for name, v in (("prompts", prompts), ("prompt_tokens", prompt_tokens),
                    ("new_tokens", new_tokens), ("batch_size", batch_size)):
        _check(name, v, _is_int(v) and v >= 1, "an int >= 1")
    _check("val_prompts", val_prompts, _is_int(val_prompts) and 0 <= val_prompts < prompts,
           f"an int in [0, prompts = {prompts})")
    if max_seq_len is not None and prompt_tokens + new_tokens > max_seq_len:
        raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} is "
                         f"longer than the model's max_seq_len {max_seq_len}")


def _content_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def write_distill_shards(model_dir: str | os.PathLike, out: str | os.PathLike,
                         data: str | Sequence[str | os.PathLike] | None = None,
                         prompts: int = 2048, prompt_tokens: int = 64, new_tokens: int = 96,
                         batch_size: int = 32, val_prompts: int | None = None,
                         val_fraction: float | None = None, quantize: str | None = None,
                         seed: int = 0, progress: bool = True) -> dict:
    """The target in ``model_dir``'s greedy continuations as shard directory ``out``
    (module docstring); returns the header.

    Parameters
    ----------
    model_dir : a model directory with ``config.json``, weights and ``tokenizer.json``
    data : "stdlib" or files/folders (default: the target run's ``data``, else stdlib)
    prompts : continuations written (train + val)
    prompt_tokens, new_tokens : tokens of each prompt window, of each continuation
    batch_size : prompts generated together
    val_prompts : of ``prompts``, how many go to the ``val`` split (default 1/20, >= 1)
    val_fraction : the held-out share of ``data`` never read (default: the target run's;
        a smaller one than the run's would read its held-out documents: ValueError)
    quantize : "mxint8" / "mxint4": generate with BFP weights (default: the saved dtype)
    seed : the prompt draw

    Skipped (the existing header returned) when ``out`` already holds the same content.
    """
    from tqdm.auto import tqdm

    from llmcore.data.prepare import ensure_shards
    from llmcore.models import Transformer
    from llmcore.tokenizer import load_tokenizer, tokenizer_hash

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model {model_dir}: no config.json in it (a model directory "
                                "as `llmcore train` saves it: RUN/final)")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"model {model_dir}: no tokenizer.json in it (prompts are "
                                "tokenised with the target's tokenizer)")
    if val_prompts is None:
        val_prompts = max(1, prompts // 20) if _is_int(prompts) and prompts >= 2 else 0
    check_args(prompts, prompt_tokens, new_tokens, batch_size, val_prompts)
    _check("quantize", quantize, quantize in (None, "mxint8", "mxint4"),
           "None, 'mxint8' or 'mxint4'")
    run_cfg = target_run_config(model_dir)
    run_vf = run_cfg.get("val_fraction")
    if data is None:
        data = run_cfg.get("data", "stdlib")
    if val_fraction is None:
        val_fraction = run_vf if run_vf is not None else 0.05
    _check("val_fraction", val_fraction, isinstance(val_fraction, (int, float)) and
           0 <= val_fraction < 1, "in [0, 1)")
    if run_vf is not None and val_fraction < run_vf:
        raise ValueError(f"val_fraction {val_fraction} is below the target run's {run_vf}: "
                         "prompts would come from documents the run held out (give "
                         f"val_fraction >= {run_vf})")

    tok = load_tokenizer(model_dir)
    shards = TokenShards(ensure_shards(data, model_dir, val_fraction, progress))
    tokens = shards.tokens("train")
    spans = document_spans(tokens, shards.eos_id)
    spans = spans[spans[:, 1] >= prompt_tokens]
    if spans.shape[0] == 0:
        raise ValueError(f"no training document of data {data!r} has prompt_tokens = "
                         f"{prompt_tokens} tokens")
    is_val = val_documents(spans.shape[0]) if val_prompts else \
        torch.zeros(spans.shape[0], dtype=torch.bool)
    if val_prompts and not is_val.any():
        raise ValueError("val_prompts > 0 needs at least 2 training documents of >= "
                         f"prompt_tokens = {prompt_tokens} tokens (give val_prompts=0)")

    settings = {"distill_version": DISTILL_VERSION, "model_sha256": _file_sha(model_dir),
                "source": shards.header["content_sha256"], "prompts": prompts,
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "val_prompts": val_prompts, "quantize": quantize, "seed": seed}
    content = _content_hash(settings)
    out = Path(out)
    old = current_header(out, content)
    if old is not None:
        return old

    model = Transformer.from_pretrained(str(model_dir), quantize=quantize).eval()
    check_args(prompts, prompt_tokens, new_tokens, batch_size, val_prompts,
               model.config.max_seq_len)
    if model.config.vocab_size != shards.vocab_size:
        raise ValueError(f"model {model_dir} has vocab_size {model.config.vocab_size}, its "
                         f"tokenizer {shards.vocab_size}")
    g = torch.Generator().manual_seed(seed)
    todo = {"train": sample_prompts(tokens, spans[~is_val], prompts - val_prompts,
                                    prompt_tokens, g),
            "val": sample_prompts(tokens, spans[is_val], val_prompts, prompt_tokens, g)}

    out.mkdir(parents=True, exist_ok=True)
    (out / "header.json").unlink(missing_ok=True)  # invalid until the new one is written
    dtype = shards.header["dtype"]
    code = "H" if dtype == "uint16" else "I"
    bar = tqdm(total=prompts * new_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc="distill", dynamic_ncols=True)
    t0 = time.perf_counter()
    splits = {}
    with torch.inference_mode():
        for split, windows in todo.items():
            tmp = out / f".{split}.bin.tmp"
            n_bytes = 0
            with open(tmp, "wb") as f:
                for i in range(0, windows.shape[0], batch_size):
                    rows = generate(model, windows[i:i + batch_size], new_tokens)  # [b, P+T]
                    for row in rows.tolist():
                        n_bytes += len(tok.decode(row).encode("utf-8"))
                        arr = array.array(code, row)
                        arr.append(shards.eos_id)
                        if sys.byteorder == "big":
                            arr.byteswap()
                        f.write(arr.tobytes())
                    bar.update(rows.shape[0] * new_tokens)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / f"{split}.bin")
            n = windows.shape[0]
            splits[split] = {"tokens": n * (prompt_tokens + new_tokens + 1), "documents": n,
                             "bytes": n_bytes}
    bar.close()
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype,
              "vocab_size": shards.vocab_size, "eos_id": shards.eos_id,
              "tokenizer_sha256": tokenizer_hash(model_dir), "content_sha256": content,
              "val_fraction": val_fraction, "data": data if isinstance(data, str) else
              [str(d) for d in data], "splits": splits,
              "distill": {**settings, "model": str(model_dir), "source_shards": str(shards.path),
                          "batch_size": batch_size, "seconds": time.perf_counter() - t0}}
    tmp = out / ".header.json.tmp"
    tmp.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "header.json")
    return header


def _file_sha(model_dir: Path) -> str:
    """sha256 of the model's config and weight files (what the continuations depend on)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix == ".safetensors"):
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()
