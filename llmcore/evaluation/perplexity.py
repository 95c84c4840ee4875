"""Perplexity and bits per byte of a model on held-out text, and the compressor it has
to beat.

Bits per byte = the summed next-token NLL / the UTF-8 bytes of the text / ln 2. Unlike
perplexity it does not depend on the tokenizer, so models with different vocabularies,
and compressors, compare on it: :func:`xz_bits_per_byte` is what ``xz -9e`` (LZMA2,
preset 9 extreme, through Python's ``lzma``) spends on the same documents, compressed one
document at a time.
"""

from __future__ import annotations

import lzma
import math
from collections.abc import Iterable

import torch
from torch import nn

from llmcore.data.shards import TokenShards
from llmcore.training.losses import bits_per_byte, cross_entropy


@torch.no_grad()
def evaluate_split(model: nn.Module, shards: TokenShards, split: str, seq_len: int,
                   batch_size: int, max_tokens: int | None = None, progress: bool = False,
                   rank: int = 0, world_size: int = 1) -> dict:
    """Next-token loss over ``split`` read in consecutive windows (every token predicted
    once, from as much context as its window gives). With ``max_tokens``, about that many
    tokens are read in windows spread evenly over the split (a prefix would be a few
    files, not a sample of the split). Returns loss (mean NLL), perplexity, bits per byte (NLL sum / the split's
    UTF-8 bytes for the tokens read / ln 2), the token count and the NLL sum. With
    ``world_size`` > 1 this rank reads every ``world_size``-th window from ``rank`` on:
    sum ``nll`` and ``tokens`` over ranks and call :func:`summarize`."""
    from tqdm.auto import tqdm

    tokens = shards.tokens(split)
    n = tokens.numel() - 1
    if n < 1:
        raise ValueError(f"{shards.path}: the {split} split has too few tokens to evaluate")
    starts = list(range(0, n, seq_len))
    if max_tokens and max_tokens < n:
        # windows spread evenly over the split (a prefix would be one or two files)
        k = max(1, -(-max_tokens // seq_len))
        starts = [starts[(i * len(starts)) // k] for i in range(k)]
    starts = starts[rank::world_size]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(starts), batch_size), disable=not progress, desc=f"eval {split}",
                  unit="batch"):
        group = starts[i:i + batch_size]
        lens = [min(seq_len, n - s) for s in group]  # the last window may be short
        width = max(lens)
        x = torch.zeros(len(group), width + 1, dtype=torch.int64)
        y = torch.full((len(group), width), -100, dtype=torch.int64)
        for r, (s, ln) in enumerate(zip(group, lens, strict=True)):
            w = tokens[s:s + ln + 1].to(torch.int64)
            x[r, :ln + 1] = w
            y[r, :ln] = w[1:]
        logits = model(x[:, :-1].to(device))
        nll += float(cross_entropy(logits, y.to(device), reduction="sum"))
        count += sum(lens)
    return summarize(nll, count, shards.bytes_per_token(split))


def summarize(nll: float, tokens: int, bytes_per_token: float) -> dict:
    """loss, ppl, bpb of a summed NLL over ``tokens`` tokens."""
    if tokens < 1:
        return {"loss": math.nan, "ppl": math.nan, "bpb": math.nan, "tokens": 0, "nll": nll}
    return {"loss": nll / tokens, "ppl": math.exp(min(nll / tokens, 700.0)),
            "bpb": bits_per_byte(nll, max(tokens * bytes_per_token, 1e-9)), "tokens": tokens,
            "nll": nll}


def xz_bits_per_byte(texts: Iterable[str]) -> dict:
    """Bits per byte of ``xz -9e`` on each text compressed alone (the container's headers
    included, as a file on disk would be)."""
    raw = packed = docs = 0
    for text in texts:
        b = text.encode("utf-8")
        raw += len(b)
        packed += len(lzma.compress(b, format=lzma.FORMAT_XZ,
                                    preset=9 | lzma.PRESET_EXTREME))
        docs += 1
    if raw == 0:
        raise ValueError("no text to compress")
    return {"bpb": 8.0 * packed / raw, "bytes": raw, "compressed_bytes": packed,
            "documents": docs}
