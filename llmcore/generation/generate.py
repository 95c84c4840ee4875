"""``generate``: batched autoregressive decoding over a static KV cache (docs/generation.md).

Prompts of different lengths come as one padded batch with an ``attention_mask`` (left or
right padding). Generation is length-aware: the real tokens of every row are moved to the
front (right-padded), the batch is prefilled in one forward pass, the cache is rolled back
to each row's real length and each row's first new token comes from the logits at its last
real token; every decode step then appends one token per row at its own length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llmcore.generation.sampling import _check, sample_next
from llmcore.ops.fused import argmax

GREEDY_CHUNK = 32  # steps per decode_greedy call: Ctrl-C is seen between calls


def _eos_set(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"eos_token_id must be a non-negative int or a list of them, "
                             f"got {eos_token_id!r}")
    return ids


def _real_spans(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """(start, length) of each row's block of ones; the block must be contiguous."""
    starts, lengths = [], []
    for b, row in enumerate(mask.tolist()):
        ones = [i for i, m in enumerate(row) if m]
        if not ones:
            raise ValueError(f"attention_mask row {b} has no real token")
        if ones[-1] - ones[0] + 1 != len(ones):
            raise ValueError(f"attention_mask row {b} is not one contiguous block of ones "
                             "(use left or right padding)")
        starts.append(ones[0])
        lengths.append(len(ones))
    return starts, lengths


def check_generation_inputs(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                            eos_token_id, pad_token_id, attention_mask, stream, seed,
                            generator) -> tuple[list[int], list[int], list[int]]:
    """Validate the arguments ``generate`` and ``assisted_generate`` share; returns (eos
    ids, start of each row's real tokens, their count)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a tensor [batch, seq], got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    batch, plen = input_ids.shape
    if batch < 1 or plen < 1:
        raise ValueError(f"input_ids must hold at least one token per row, got shape "
                         f"{list(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check(torch.zeros(1, 1), temperature, top_k, top_p)
    eos = _eos_set(eos_token_id)
    if pad_token_id is not None and (isinstance(pad_token_id, bool)
                                     or not isinstance(pad_token_id, int) or pad_token_id < 0):
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if stream is not None and not callable(stream):
        raise ValueError("stream must be callable")
    cfg = model.config
    vocab = cfg.vocab_size
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) \
                or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids "
                             f"{list(input_ids.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask))}")
        am = attention_mask.to("cpu")
        if not bool(((am == 0) | (am == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        starts, lengths = _real_spans(am)
    else:
        starts, lengths = [0] * batch, [plen] * batch
    ids = input_ids.to("cpu", torch.int64)
    real = torch.cat([ids[b, s:s + n] for b, (s, n) in enumerate(zip(starts, lengths, strict=True))])
    if int(real.min()) < 0 or int(real.max()) >= vocab:
        raise ValueError(f"input_ids must be in [0, {vocab}) (the model's vocab_size)")
    longest = max(lengths)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} is "
                         f"longer than the model's max_seq_len={cfg.max_seq_len}")
    return eos, starts, lengths


def pad_token(eos: Sequence[int], pad_token_id: int | None) -> int:
    """The token that fills a row's positions after it stopped: ``pad_token_id`` when
    given, else the first EOS id in the order the caller listed them (``eos_token_id=[200,
    174]`` pads with 200), else 0. ``generate`` and ``assisted_generate`` both pad so."""
    if pad_token_id is not None:
        return pad_token_id
    return eos[0] if eos else 0


def finish_batch(input_ids: torch.Tensor, new_tokens, fill: int) -> torch.Tensor:
    """The prompt rows as given, then each row's new tokens (a LongTensor [batch, n] or a
    list of token lists), rows shorter than the longest padded with ``fill``: a tensor
    [batch, prompt_len + n_new] on input_ids' device, in its dtype."""
    if isinstance(new_tokens, torch.Tensor):
        new = new_tokens
    else:
        new = torch.full((len(new_tokens), max(len(r) for r in new_tokens)), fill,
                         dtype=torch.int64)
        for b, row in enumerate(new_tokens):
            new[b, :len(row)] = torch.as_tensor(row, dtype=torch.int64)
    return torch.cat([input_ids, new.to(input_ids.device, input_ids.dtype)], dim=1)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, cache_storage: str = "native",
             stream: Callable[[torch.Tensor], object] | None = None, seed: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Parameters
    ----------
    model : llmcore.models.Transformer (anything with ``config``, ``new_cache`` and
        ``model(ids, cache=cache, prefill=...)``)
    input_ids : LongTensor [batch, prompt_len]
    attention_mask : [batch, prompt_len] of 0/1, optional
        Marks the real tokens of each row (one contiguous block: left or right padding).
    temperature, top_k, top_p : sampling (temperature 0: greedy)
    eos_token_id : int or list of ints, optional
        A row stops after producing one of them; its later positions hold
        :func:`pad_token`: ``pad_token_id``, or the first eos id in the order given.
    cache_storage : "native", "mxint8", "float32", "bfloat16" or "float16" (see KVCache)
    stream : callable, optional
        Called after each step with that step's new tokens, LongTensor [batch].
    seed, generator : reproducible sampling (``seed`` makes a generator on the model's
        device; give one or the other)

    Returns
    -------
    LongTensor [batch, prompt_len + n_new]: the prompt rows as given, then the new tokens
    (n_new <= max_new_tokens; fewer when every row stopped early).
    """
    eos, starts, lengths = check_generation_inputs(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
        pad_token_id, attention_mask, stream, seed, generator)
    batch = input_ids.shape[0]
    device = model.device
    ids = input_ids.to(device=device, dtype=torch.int64)
    longest = max(lengths)
    if max_new_tokens == 0:
        return input_ids.clone()

    fill = pad_token(eos, pad_token_id)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    # Prefill right-packed: each row's real tokens first, then filler (never attended by
    # the real tokens under the causal mask, and dropped by the rollback).
    width = longest
    packed = torch.zeros(batch, width, dtype=torch.int64, device=device)
    for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        packed[b, :n] = ids[b, s:s + n]
    cache = model.new_cache(batch, width + max_new_tokens, storage=cache_storage)
    last = torch.tensor(lengths, device=device) - 1  # only each row's last logits: the head
    next_logits = model(packed, cache=cache, prefill=True,  # is not run over the prompt
                        logits_to_keep=last.unsqueeze(1))[:, 0]  # [B, V]
    cache.rollback(lengths)

    eos_t = torch.tensor(eos, dtype=torch.int64, device=device) if eos else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    decode = getattr(model, "decode_greedy", None) if temperature == 0 else None
    if decode is not None:  # the model's own greedy loop (one op call per chunk on the CPU)
        return finish_batch(input_ids, _greedy(decode, argmax(next_logits), cache,
                                               max_new_tokens, eos, eos_t, fill, stream), fill)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        tok = sample_next(next_logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, fill), tok)
        out.append(tok)
        if stream is not None:
            stream(tok.clone())
        if eos_t is not None:
            done = done | torch.isin(tok, eos_t)
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            next_logits = model(tok.unsqueeze(1), cache=cache)[:, -1]
    return finish_batch(input_ids, torch.stack(out, dim=1), fill)


def _greedy(decode, tok: torch.Tensor, cache, max_new_tokens: int, eos: list[int],
            eos_t: torch.Tensor | None, fill: int, stream) -> torch.Tensor:
    """generate's greedy loop through ``model.decode_greedy``: the same tokens as its
    step-by-step loop, in chunks of GREEDY_CHUNK steps (one step per call with a stream)."""
    pieces = [tok.unsqueeze(1)]
    if stream is not None:
        stream(tok.clone())
    done = torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(tok, dtype=torch.bool)
    left = max_new_tokens - 1
    while left and not (eos_t is not None and bool(done.all())):
        new = decode(tok, cache, 1 if stream is not None else min(left, GREEDY_CHUNK),
                     eos_token_id=eos, fill=fill, done=done)
        if stream is not None:
            stream(new[:, 0].clone())
        pieces.append(new)
        left -= new.shape[1]
        tok = new[:, -1]
        if eos_t is not None:
            done = done | torch.isin(new, eos_t).any(1)
    return torch.cat(pieces, dim=1)
