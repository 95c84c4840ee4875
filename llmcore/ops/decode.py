"""KV-cached decoding attention and cache writes (docs/decode.md).

During generation each new token reads the whole KV cache, so decoding is bound by memory
bandwidth. ``decode_attention`` reads the cache once per KV head for all query heads of
its GQA group, splits long caches across threads / thread blocks and merges the partial
results by their logsumexp (flash-decoding). A cache stored as MXINT8 (a
:class:`~llmcore.ops.BFPTensor` with int8 mantissas and one exponent per 32 elements of
head_dim) halves the bytes read compared with fp16.
"""

from __future__ import annotations

import math

import torch

from llmcore import _ext
from llmcore import reference as ref
from llmcore.ops._dispatch import use_kernel
from llmcore.ops.bfp import FLOAT_DTYPES, BFPTensor

CACHE_FORMAT = "mxint8"  # the only BFP cache format: 8-bit mantissas, blocks of 32 along D


def _split(name: str, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A cache as (values or mantissas, exponents or None)."""
    if isinstance(cache, BFPTensor):
        f = cache.format
        if f.mantissa_bits != 8 or f.block_size != 32:
            raise ValueError(f"{name} as a BFPTensor must be mxint8 (8 bits, blocks of 32), "
                             f"got {f.name} ({f.mantissa_bits} bits, block {f.block_size})")
        if cache.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {list(cache.shape)}")
        return cache.mantissa, cache.exponent
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or an mxint8 BFPTensor, got {type(cache).__name__}")
    if cache.dim() != 4:
        raise ValueError(f"{name} must be 4-D ([batch, max_seq, kv_heads, head_dim] or "
                         f"[num_pages, page_size, kv_heads, head_dim]), got shape {list(cache.shape)}")
    return cache, None


def _check_int32(name: str, t, shape_desc: str, dim: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dim:
        got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an int32 tensor {shape_desc}, got {got}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _capacity(cache_shape, block_table) -> int:
    if block_table is None:
        return cache_shape[1]
    return block_table.shape[1] * cache_shape[1]


def _check_table_values(block_table, lengths: torch.Tensor, page_size: int, num_pages: int,
                        what: str) -> None:
    """Every page a valid position maps to must exist (host check)."""
    bt = block_table.cpu()
    for b, length in enumerate(lengths.tolist()):
        used = bt[b, : -(-length // page_size)]
        if used.numel() and (used.min().item() < 0 or used.max().item() >= num_pages):
            raise ValueError(f"block_table[{b}] maps the {what} positions to pages "
                             f"{used.tolist()}, outside [0, {num_pages})")


def _as_cache_dtype(x: torch.Tensor, kc: torch.Tensor, ke) -> torch.Tensor:
    """x for the kernels of x's device: the CPU kernels take a float cache of any float
    dtype; the others take the cache's dtype (x is rounded to it, as the cache holds it)."""
    if ke is not None or kc.dtype == x.dtype or x.device.type == "cpu":
        return x
    return x.to(kc.dtype)


def _check_cache_pair(q_like: torch.Tensor, kc, vc, ke, ve, block_table, batch: int) -> None:
    if kc.shape != vc.shape or kc.dtype != vc.dtype:
        raise ValueError(f"k_cache and v_cache must match, got {kc.dtype} {list(kc.shape)} and "
                         f"{vc.dtype} {list(vc.shape)}")
    if (ke is None) != (ve is None):
        raise ValueError("k_cache and v_cache must both be mxint8 BFPTensors or both float tensors")
    if ke is None and kc.dtype not in FLOAT_DTYPES:
        raise ValueError(f"a float cache must be float32, bfloat16 or float16 (any of them, "
                         f"whatever the new tokens' dtype), got {kc.dtype}; or the cache must "
                         f"be mxint8")
    if kc.device != q_like.device:
        raise ValueError(f"the cache must be on {q_like.device}, got {kc.device}")
    if kc.shape[-1] != q_like.shape[-1]:
        raise ValueError(f"cache head_dim {kc.shape[-1]} != head_dim {q_like.shape[-1]}")
    if block_table is None:
        if kc.shape[0] != batch:
            raise ValueError(f"a contiguous cache must have batch {batch} in dim 0, got shape "
                             f"{list(kc.shape)} (pass block_table for a paged cache)")
    else:
        _check_int32("block_table", block_table, "[batch, max_pages]", 2, q_like.device)
        if kc.shape[1] < 1:
            raise ValueError(f"a paged cache needs page_size (dim 1 of the cache) >= 1, got "
                             f"shape {list(kc.shape)}")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (batch), got "
                             f"{list(block_table.shape)}")


def decode_attention(q: torch.Tensor, k_cache, v_cache, cache_seqlens: torch.Tensor,
                     softmax_scale: float | None = None, block_table: torch.Tensor | None = None,
                     return_lse: bool = False, validate: bool = True):
    """Attention of a few new tokens over a KV cache.

    Parameters
    ----------
    q : Tensor [batch, q_len, heads, head_dim]
        The new tokens' queries (q_len 1 for plain decoding, up to ~16 to verify a draft;
        any q_len works). Causal among the new tokens: they are the last q_len positions
        of each sequence, so query t sees keys ``j <= cache_seqlens[b] - q_len + t``.
    k_cache, v_cache : Tensor or mxint8 BFPTensor
        Contiguous ``[batch, max_seq, kv_heads, head_dim]`` or paged
        ``[num_pages, page_size, kv_heads, head_dim]`` (with ``block_table``); float32,
        bfloat16 or float16 (not necessarily q's dtype: the CPU kernel widens cache rows
        to fp32 and keeps q as it is; other devices round q to the cache's dtype), or
        mxint8 (int8 mantissas, one exponent per 32 elements of head_dim).
        ``heads % kv_heads == 0``.
    cache_seqlens : int32 Tensor [batch]
        Valid length of each sequence, the new tokens included; 0 <= length <= capacity.
    softmax_scale : float, optional
        Default 1/sqrt(head_dim).
    block_table : int32 Tensor [batch, max_pages], optional
        Page of each block of ``page_size`` positions of each sequence.
    return_lse : bool
        Also return lse [batch, heads, q_len] float32 (to merge with other attention).
    validate : bool
        Check the values of cache_seqlens and block_table on the host (one device sync on
        GPU). Callers that track lengths on the host (:class:`llmcore.models.KVCache`)
        pass False; the kernels never read outside the cache either way.

    Returns
    -------
    out : Tensor [batch, q_len, heads, head_dim] in q's dtype (0 for a query that sees no
    key); lse with ``return_lse``.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [batch, q_len, heads, head_dim], got "
                         f"{list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    kc, ke = _split("k_cache", k_cache)
    vc, ve = _split("v_cache", v_cache)
    b, lq, h, d = q.shape
    _check_cache_pair(q, kc, vc, ke, ve, block_table, b)
    hkv = kc.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q's heads ({h}) must be a multiple of the cache's kv_heads ({hkv})")
    _check_int32("cache_seqlens", cache_seqlens, "[batch]", 1, q.device)
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens must have {b} entries (batch), got {cache_seqlens.shape[0]}")
    cap = _capacity(kc.shape, block_table)
    if validate:
        lens = cache_seqlens.cpu()
        if lens.numel() and (lens.min().item() < 0 or lens.max().item() > cap):
            raise ValueError(f"cache_seqlens must lie in [0, {cap}] (the cache capacity), got "
                             f"{lens.tolist()}")
        if block_table is not None:
            _check_table_values(block_table, lens, kc.shape[1], kc.shape[0], "valid")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    qk = _as_cache_dtype(q, kc, ke)
    if use_kernel("decode_attention", q.device, qk.dtype, d):
        out, lse = torch.ops.llmcore.decode_attention(qk, kc, vc, cache_seqlens, scale,
                                                      block_table, ke, ve)
        out = out.to(q.dtype)
    else:
        out, lse = ref.decode_attention(q, kc, vc, cache_seqlens, scale, block_table, ke, ve,
                                        upcast=False)
    return (out, lse) if return_lse else out


def kv_cache_append(k_cache, v_cache, k: torch.Tensor, v: torch.Tensor, start_pos: torch.Tensor,
                    block_table: torch.Tensor | None = None, validate: bool = True) -> None:
    """Write new keys/values into a cache, in place.

    Parameters
    ----------
    k_cache, v_cache : Tensor or mxint8 BFPTensor
        As for :func:`decode_attention`. An mxint8 cache quantises each 32-element block
        of head_dim (round half away from zero) into its mantissas and exponents.
    k, v : Tensor [batch, T, kv_heads, head_dim]
    start_pos : int32 Tensor [batch]
        Position of the first new token of each sequence; positions start_pos[b] .. +T
        are written and nothing else.
    block_table : int32 Tensor [batch, max_pages], optional (paged cache)
    validate : bool
        Check start_pos + T <= capacity and the pages on the host (see decode_attention).
    """
    for n, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{n} must be a 4-D tensor [batch, T, kv_heads, head_dim]")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k and v must have the same shape and dtype, got {k.dtype} "
                         f"{list(k.shape)} and {v.dtype} {list(v.shape)}")
    if k.dtype not in FLOAT_DTYPES:
        raise ValueError(f"k must be float32, bfloat16 or float16, got {k.dtype}")
    kc, ke = _split("k_cache", k_cache)
    vc, ve = _split("v_cache", v_cache)
    b, t, hkv, _ = k.shape
    _check_cache_pair(k, kc, vc, ke, ve, block_table, b)
    if kc.shape[2] != hkv:
        raise ValueError(f"k has {hkv} kv heads, the cache {kc.shape[2]}")
    _check_int32("start_pos", start_pos, "[batch]", 1, k.device)
    if start_pos.shape[0] != b:
        raise ValueError(f"start_pos must have {b} entries (batch), got {start_pos.shape[0]}")
    if validate:
        cap = _capacity(kc.shape, block_table)
        sp = start_pos.cpu()
        if sp.numel() and (sp.min().item() < 0 or sp.max().item() + t > cap):
            raise ValueError(f"start_pos + {t} new tokens must lie in [0, {cap}] (the cache "
                             f"capacity), got start_pos {sp.tolist()}")
        if block_table is not None:
            _check_table_values(block_table, sp + t, kc.shape[1], kc.shape[0], "written")
    if t == 0 or b == 0:
        return
    k, v = _as_cache_dtype(k, kc, ke), _as_cache_dtype(v, kc, ke)
    if use_kernel("kv_cache_append", k.device, k.dtype):
        torch.ops.llmcore.kv_cache_append(kc, vc, k, v, start_pos, block_table, ke, ve)
    else:
        ref.kv_cache_append(kc, vc, k, v, start_pos, block_table, ke, ve)


if _ext.has_op("decode_attention"):

    @torch.library.register_fake("llmcore::decode_attention")
    def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, block_table, k_exponent,
          v_exponent):
        b, lq, h, _ = q.shape
        return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32)

    @torch.library.register_fake("llmcore::kv_cache_append")
    def _(k_cache, v_cache, k, v, start_pos, block_table, k_exponent, v_exponent):
        return None
