"""Reference KV-cached decoding (docs/decode.md): gather each sequence's valid prefix out of
the (contiguous or paged, float or MXINT8) cache and run the float64 attention oracle.
"""

from __future__ import annotations

import torch

from llmcore.reference.attention import attention_fwd
from llmcore.reference.bfp import bfp_dequantize, bfp_quantize

KV_BLOCK = 32  # MXINT8 cache: one exponent per 32 elements of head_dim
KV_BITS = 8


def gather(cache: torch.Tensor, b: int, length: int, block_table: torch.Tensor | None
           ) -> torch.Tensor:
    """Rows 0..length of sequence b: [length, Hkv, X] (X = D, or D/32 exponents)."""
    if block_table is None:
        return cache[b, :length]
    page = cache.shape[1]
    n_pages = -(-length // page)
    pages = cache[block_table[b, :n_pages].long()]  # [n_pages, page, Hkv, X]
    return pages.reshape(n_pages * page, *cache.shape[2:])[:length]


def _dequant(m: torch.Tensor, e: torch.Tensor | None, d: int) -> torch.Tensor:
    if e is None:
        return m
    return bfp_dequantize(m, e, KV_BITS, KV_BLOCK, d, torch.float64)


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, block_table=None,
                     k_exponent=None, v_exponent=None, upcast=True):
    """-> (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32)."""
    b, lq, h, d = q.shape
    outs, lses = [], []
    for i, length in enumerate(cache_seqlens.tolist()):
        k = _dequant(gather(k_cache, i, length, block_table),
                     None if k_exponent is None else gather(k_exponent, i, length, block_table), d)
        v = _dequant(gather(v_cache, i, length, block_table),
                     None if v_exponent is None else gather(v_exponent, i, length, block_table), d)
        dt = torch.float64 if upcast else torch.float32
        o, l = attention_fwd(q[i:i + 1].to(dt), k.unsqueeze(0).to(dt), v.unsqueeze(0).to(dt),
                             causal=True, softmax_scale=softmax_scale)
        outs.append(o.to(q.dtype))
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _rows(cache, b: int, start: int, n: int, block_table):
    """(page-or-batch index, row index) of positions start..start+n of sequence b."""
    pos = torch.arange(start, start + n)
    if block_table is None:
        return torch.full_like(pos, b), pos
    page = cache.shape[1]
    return block_table[b].cpu().long()[pos // page], pos % page


def kv_cache_append(k_cache, v_cache, k, v, start_pos, block_table=None, k_exponent=None,
                    v_exponent=None) -> None:
    """Write k/v [B, T, Hkv, D] at positions start_pos[b] + t, in place."""
    t = k.shape[1]
    for cache, exp, new in ((k_cache, k_exponent, k), (v_cache, v_exponent, v)):
        if exp is not None:
            m, e = bfp_quantize(new, KV_BITS, KV_BLOCK, False)
        else:
            m, e = new.to(cache.dtype), None
        for b, start in enumerate(start_pos.tolist()):
            pi, ri = _rows(cache, b, start, t, block_table)
            cache[pi.to(cache.device), ri.to(cache.device)] = m[b]
            if exp is not None:
                exp[pi.to(exp.device), ri.to(exp.device)] = e[b]
