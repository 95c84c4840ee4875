"""Helpers of the KV-cached decoding tests (tests/test_decode_*.py,
test_kv_cache_append.py, test_kvcache.py): caches poisoned past each length, paging, the
float64 references and the 2x check.

Tolerance (docs/testing.md): the max error of llmcore against the
float64 reference is at most twice the max error of PyTorch at the same precision plus a
small floor (1e-5 for float32, two ulps at magnitude 1 for the half types). "PyTorch at the
same precision" is the larger error of ``reference.decode_attention(..., upcast=False)``
(fp32 math, rounded to q's dtype) and of ``reference.attention_fwd(..., upcast=False)`` in
q's dtype (flash-attention's convention). Cache writes, MXINT8 quantisation, paged vs
contiguous and rollback-vs-never-appended are checked bit for bit. Memory the kernels must
not read or write (positions past each length, pages no sequence uses, guard bands around
the cache) is poisoned with NaN / exponent 255 / mantissa -128.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import check_2x, randn, randn_blocks
from llmcore import _ext
from llmcore import reference as ref
from llmcore.ops import BFPTensor
from llmcore.reference import decode as ref_decode

MANT_POISON = -128  # never produced by MXINT8 quantisation (mantissas are clamped to +-127)
EXP_POISON = 255  # the Inf/NaN block marker: dequantises to NaN, never written for finite data


def head_dim_on(device, d: int) -> int:
    """80 (not a multiple of 32: a partial MXINT8 block) is a CPU-only head_dim."""
    return 64 if device.type == "cuda" and d == 80 else d


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (NaN payloads included), on the CPU."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def mixed_lengths(batch: int, cap: int, q_len: int) -> list[int]:
    """0, 1, the capacity, a length below q_len (queries that see no key) and random ones."""
    if batch == 1:
        return [int(torch.randint(max(1, cap // 2), cap + 1, ()))]
    pool = [0, 1, cap, int(torch.randint(0, min(q_len, cap) + 1, ())),
            int(torch.randint(2, cap + 1, ()))]
    pool += [int(torch.randint(0, cap + 1, ())) for _ in range(max(0, batch - len(pool)))]
    return [pool[i] for i in torch.randperm(len(pool))[:batch].tolist()]


def float_cache(b, cap, hkv, d, dtype, lengths):
    """k, v [b, cap, hkv, d] on the CPU: random rows below each length, NaN past it."""
    out = []
    for _ in range(2):
        c = randn((b, cap, hkv, d), dtype)
        for i, n in enumerate(lengths):
            c[i, n:] = float("nan")
        out.append(c)
    return out


def mx_cache(b, cap, hkv, d, lengths, log2_range=(-4.0, 4.0)):
    """MXINT8 k, v as (mantissa, exponent) pairs on the CPU; poisoned past each length."""
    out = []
    for _ in range(2):
        m, e = ref.bfp_quantize(randn_blocks((b, cap, hkv, d), 32, log2_range=log2_range),
                                8, 32, False)
        for i, n in enumerate(lengths):
            m[i, n:] = MANT_POISON
            e[i, n:] = EXP_POISON
        out.append((m, e))
    return out


def to_paged(parts, lengths, page_size: int, poisons):
    """Scatter contiguous [B, cap, ...] tensors into shuffled pages.

    Returns (paged tensors [num_pages, page_size, ...], block_table int32 [B, max_pages]).
    Entries of the table past each sequence's last page point at a spare poisoned page."""
    b, cap = parts[0].shape[:2]
    max_pages = -(-cap // page_size)
    used = [-(-n // page_size) for n in lengths]
    total = sum(used) + 2
    perm = torch.randperm(total).tolist()
    spare = perm[-1]
    table = torch.full((b, max_pages), spare, dtype=torch.int32)
    paged = [torch.full((total, page_size, *p.shape[2:]), poison, dtype=p.dtype)
             for p, poison in zip(parts, poisons, strict=True)]
    nxt = 0
    for i in range(b):
        for j in range(used[i]):
            pid = perm[nxt]
            nxt += 1
            table[i, j] = pid
            lo, hi = j * page_size, min((j + 1) * page_size, cap)
            for p, src in zip(paged, parts, strict=True):
                p[pid, : hi - lo] = src[i, lo:hi]
    return paged, table


def paged_cache(b, cap, hkv, d, dtype, lengths, page_size: int, storage: str):
    """A random cache ("native" float or "mxint8") poisoned past each length, contiguous
    and scattered into pages: (contiguous parts, paged parts, block_table, the poison of
    each part)."""
    if storage == "mxint8":
        (km, ke), (vm, ve) = mx_cache(b, cap, hkv, d, lengths)
        parts = [km, ke, vm, ve]
        poisons = [MANT_POISON, EXP_POISON, MANT_POISON, EXP_POISON]
    else:
        parts = float_cache(b, cap, hkv, d, dtype, lengths)
        poisons = [float("nan")] * 2
    paged, table = to_paged(parts, lengths, page_size, poisons)
    return parts, paged, table, poisons


def as_bfp(m, e, dtype=torch.float32) -> BFPTensor:
    return BFPTensor(m, e, "mxint8", tuple(m.shape), dtype)


def references(q, kc, vc, seqlens, scale, table=None, ke=None, ve=None):
    """(out64, lse64, [same-precision outs], [same-precision lses]) on the CPU."""
    q, seqlens = q.cpu(), seqlens.cpu()
    table = None if table is None else table.cpu()
    d = q.shape[-1]
    if ke is not None:  # dequantise once (exactly, in float64; poisoned blocks give NaN)
        kc = ref.bfp_dequantize(kc.cpu(), ke.cpu(), 8, 32, d, torch.float64)
        vc = ref.bfp_dequantize(vc.cpu(), ve.cpu(), 8, 32, d, torch.float64)
    kc, vc = kc.cpu(), vc.cpu()
    s = 1.0 / math.sqrt(d) if scale is None else scale
    o64, l64 = ref.decode_attention(q.double(), kc, vc, seqlens, s, table, upcast=True)
    o32, l32 = ref.decode_attention(q, kc, vc, seqlens, s, table, upcast=False)
    # the same attention computed in q's dtype (flash-attention's "PyTorch at the same
    # precision")
    outs, lses = [], []
    for i, n in enumerate(seqlens.tolist()):
        k = ref_decode.gather(kc, i, n, table).to(q.dtype)
        v = ref_decode.gather(vc, i, n, table).to(q.dtype)
        o, lse = ref.attention_fwd(q[i:i + 1], k.unsqueeze(0), v.unsqueeze(0), causal=True,
                                   softmax_scale=s, upcast=False)
        outs.append(o)
        lses.append(lse)
    return o64, l64, [o32, torch.cat(outs)], [l32, torch.cat(lses)]


def check_decode(out, lse, q, kc, vc, seqlens, scale, table=None, ke=None, ve=None,
                 what=""):
    o64, l64, opts, lpts = references(q, kc, vc, seqlens, scale, table, ke, ve)
    assert out.dtype == q.dtype and out.shape == q.shape, f"{what}: out {out.dtype} {out.shape}"
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    # a query that sees no key: exactly 0 and lse -inf
    lq = q.shape[1]
    empty = (seqlens.cpu().long().unsqueeze(1) - lq + torch.arange(lq).unsqueeze(0)) < 0
    if empty.any():
        assert torch.equal(out.cpu()[empty], torch.zeros_like(out.cpu()[empty])), \
            f"{what}: a query that sees no key must give exactly 0"
        assert torch.isneginf(lse.cpu().transpose(1, 2)[empty]).all(), \
            f"{what}: a query that sees no key must give lse -inf"
    check_2x(out, o64, opts, q.dtype, f"{what} out")
    check_2x(lse, l64, lpts, q.dtype, f"{what} lse")


def need_kernel(op: str, device) -> None:
    if not _ext.has_kernel(op, device):
        pytest.fail(f"no llmcore::{op} kernel for {device.type}")



def drop_positions(part: torch.Tensor, lengths, drops, poison):
    """A contiguous cache [B, cap, ...] with positions ``drops[b]`` (a range) removed from
    sequence b: the later rows move up, poison fills the freed tail. -> (cache, lengths)."""
    out = torch.full_like(part, poison)
    new_lengths = []
    for i, n in enumerate(lengths):
        keep = [j for j in range(n) if j not in drops[i]]
        out[i, :len(keep)] = part[i, keep]
        new_lengths.append(len(keep))
    return out, new_lengths
