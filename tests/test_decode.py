"""KV-cached decoding (DESIGN §2.4): ``ops.decode_attention``, ``ops.kv_cache_append`` and
``models.KVCache`` against the float64 reference in llmcore.reference.decode.

Tolerance (STYLE "A reference beside every kernel"): the max error of llmcore against the
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

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import check_2x, randn, randn_blocks

from llmcore import _ext, ops
from llmcore import reference as ref
from llmcore.models import KVCache
from llmcore.ops import BFPTensor
from llmcore.reference import decode as ref_decode

KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
                 "cuda": (torch.float16, torch.bfloat16)}
MANT_POISON = -128  # never produced by MXINT8 quantisation (mantissas are clamped to +-127)
EXP_POISON = 255  # the Inf/NaN block marker: dequantises to NaN, never written for finite data

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["best", "scalar"])
def isa(request, device, monkeypatch) -> str:
    """The CPU decode kernels' paths: the best the CPU has (AVX-512) and the portable one
    (LLMCORE_CPU_ISA, read on every call). One run on CUDA."""
    if request.param == "scalar":
        if device.type != "cpu":
            pytest.skip("CPU ISA selection")
        monkeypatch.setenv("LLMCORE_CPU_ISA", "scalar")
    else:
        monkeypatch.delenv("LLMCORE_CPU_ISA", raising=False)
    return request.param


def need_kernel_dtype(device, dtype) -> None:
    if dtype not in KERNEL_DTYPES[device.type]:
        pytest.skip(f"{dtype} takes the reference path on {device.type}")


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


# ---------------------------------------------------------------------------------------
# kernels registered
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["decode_attention", "kv_cache_append"])
def test_kernel_registered(device, op):
    assert _ext.has_op(op), f"the extension does not define llmcore::{op} (stale build?)"
    assert _ext.has_kernel(op, device), f"no llmcore::{op} kernel for {device.type}"


# ---------------------------------------------------------------------------------------
# decode_attention against the reference
# ---------------------------------------------------------------------------------------
# batch, kv_heads, group (heads // kv_heads), head_dim, q_len, capacity, softmax_scale,
# non-contiguous q
DECODE_CASES = [
    (1, 1, 1, 64, 1, 97, None, False),
    (5, 2, 4, 128, 1, 97, None, False),
    (5, 1, 8, 64, 4, 61, None, True),
    (5, 2, 1, 80, 16, 33, 0.3, False),
    (5, 3, 4, 64, 16, 7, None, False),
    (1, 1, 8, 128, 16, 1025, None, False),  # one long sequence: the KV split (flash-decoding)
    (1, 2, 4, 80, 1, 1025, 0.05, True),
    (5, 1, 4, 128, 4, 300, 0.05, False),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "b{}_hkv{}_g{}_d{}_q{}_s{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_decode_attention_matches_reference(device, isa, dtype, case):
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, lq, cap, scale, noncontig = case
    d = head_dim_on(device, d)
    lengths = mixed_lengths(b, cap, lq)
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    if noncontig:
        q = randn((b, hkv * g, lq, d), dtype).transpose(1, 2)
    else:
        q = randn((b, lq, hkv * g, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = ops.decode_attention(q.to(device), kc.to(device), vc.to(device),
                                    seqlens.to(device), softmax_scale=scale, return_lse=True)
    check_decode(out, lse, q, kc, vc, seqlens, scale, what=f"lengths {lengths}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_attention_queries_without_keys(device, dtype):
    """q_len > length: the first queries see no key (out exactly 0, lse -inf, no NaN)."""
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, lq, cap = 4, 2, 4, head_dim_on(device, 80), 16, 40
    lengths = [0, 1, 15, 16]
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    q = randn((b, lq, hkv * g, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = ops.decode_attention(q.to(device), kc.to(device), vc.to(device),
                                    seqlens.to(device), return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert torch.isneginf(lse[0]).all()
    assert torch.equal(out[1, :15].cpu(), torch.zeros_like(out[1, :15].cpu()))
    assert torch.isfinite(lse[1, :, 15]).all()
    check_decode(out, lse, q, kc, vc, seqlens, None, what=f"lengths {lengths}")


def test_decode_attention_empty(device):
    """batch 0 and q_len 0: empty outputs of the right shapes, no crash."""
    dtype = KERNEL_DTYPES[device.type][-1]
    kc, vc = (randn((2, 9, 2, 64), dtype, device) for _ in range(2))
    sl = torch.tensor([3, 9], dtype=torch.int32, device=device)
    out, lse = ops.decode_attention(randn((2, 0, 4, 64), dtype, device), kc, vc, sl,
                                    return_lse=True)
    assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 4, 0)
    out, lse = ops.decode_attention(randn((0, 1, 4, 64), dtype, device), kc[:0], vc[:0],
                                    sl[:0], return_lse=True)
    assert out.shape == (0, 1, 4, 64) and lse.shape == (0, 4, 1) and lse.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# paged == contiguous, bit for bit
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "mxint8"])
def test_paged_equals_contiguous(device, storage, page_size):
    dtype = torch.float32 if storage == "mxint8" else getattr(torch, storage)
    if storage == "mxint8" and device.type == "cuda":
        dtype = torch.float16
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, cap = 5, 2, 4, head_dim_on(device, 80), 300
    for lq in ((4,) if page_size in (1, 16) else (1,)):
        lengths = mixed_lengths(b, cap, lq)
        q = randn((b, lq, hkv * g, d), dtype).to(device)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        if storage == "mxint8":
            (km, ke), (vm, ve) = mx_cache(b, cap, hkv, d, lengths)
            parts = [km, ke, vm, ve]
            poisons = [MANT_POISON, EXP_POISON, MANT_POISON, EXP_POISON]
        else:
            parts = float_cache(b, cap, hkv, d, dtype, lengths)
            poisons = [float("nan")] * 2
        paged, table = to_paged(parts, lengths, page_size, poisons)
        parts = [p.to(device) for p in parts]
        paged = [p.to(device) for p in paged]
        if storage == "mxint8":
            cont_args = (as_bfp(*parts[:2], dtype), as_bfp(*parts[2:], dtype))
            paged_args = (as_bfp(*paged[:2], dtype), as_bfp(*paged[2:], dtype))
        else:
            cont_args, paged_args = tuple(parts), tuple(paged)
        out_c, lse_c = ops.decode_attention(q, *cont_args, seqlens, return_lse=True)
        out_p, lse_p = ops.decode_attention(q, *paged_args, seqlens, block_table=table.to(device),
                                            return_lse=True)
        what = f"page_size {page_size}, q_len {lq}, lengths {lengths}"
        assert torch.equal(out_p, out_c), f"{what}: paged out != contiguous out " \
            f"(max diff {(out_p.double() - out_c.double()).abs().nan_to_num(1e300).max():.3e})"
        assert torch.equal(lse_p, lse_c), f"{what}: paged lse != contiguous lse"
        if storage == "mxint8":
            check_decode(out_p, lse_p, q, paged[0], paged[2], seqlens, None, table,
                         paged[1], paged[3], what=what)
        else:
            check_decode(out_p, lse_p, q, *paged, seqlens, None, table, what=what)


# ---------------------------------------------------------------------------------------
# MXINT8 cache
# ---------------------------------------------------------------------------------------
MX_CASES = [(torch.float32, 80, 1), (torch.bfloat16, 128, 4), (torch.float16, 64, 16)]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("mx_case", MX_CASES, ids=lambda c: f"{c[0]}_d{c[1]}_q{c[2]}")
def test_decode_attention_mxint8(device, isa, mx_case, paged):
    """Over an MXINT8 cache: the attention of the dequantised cache (to the precision of q's
    dtype), and within the quantisation error of the same attention over the float cache."""
    dtype, d, lq = mx_case
    need_kernel_dtype(device, dtype)
    b, hkv, g, cap, d = 5, 2, 4, 129, head_dim_on(device, d)
    lengths = mixed_lengths(b, cap, lq)
    kf = randn((b, cap, hkv, d), torch.float32)
    vf = randn((b, cap, hkv, d), torch.float32)
    (km, ke), (vm, ve) = (ref.bfp_quantize(t, 8, 32, False) for t in (kf, vf))
    for i, n in enumerate(lengths):
        for t in (km, vm):
            t[i, n:] = MANT_POISON
        for t in (ke, ve):
            t[i, n:] = EXP_POISON
    q = randn((b, lq, hkv * g, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    table = None
    if paged:
        (km, ke, vm, ve), table = to_paged(
            [km, ke, vm, ve], lengths, 16, [MANT_POISON, EXP_POISON] * 2)
    kb = as_bfp(km.to(device), ke.to(device), dtype)
    vb = as_bfp(vm.to(device), ve.to(device), dtype)
    out, lse = ops.decode_attention(q.to(device), kb, vb, seqlens.to(device),
                                    block_table=None if table is None else table.to(device),
                                    return_lse=True)
    what = f"d {d}, q_len {lq}, lengths {lengths}"
    check_decode(out, lse, q, km, vm, seqlens, None, table, ke, ve, what=what)
    # against attention over the unquantised cache
    o_float, _ = ref.decode_attention(q.double(), kf, vf, seqlens, 1 / math.sqrt(d),
                                      upcast=True)
    seen = (seqlens.long().unsqueeze(1) - lq + torch.arange(lq)) >= 0
    assert rel_err(out.cpu()[seen], o_float[seen]) < 2e-2, what


# ---------------------------------------------------------------------------------------
# kv_cache_append: exactly the right slots, nothing else
# ---------------------------------------------------------------------------------------
def tie_data(b, t, hkv, d, dtype) -> torch.Tensor:
    """New tokens with quantisation edge cases: ties (x.5 mantissas), values that round up
    to 128 (clamped to 127), an all-zero block, negative ties."""
    x = randn_blocks((b, t, hkv, d), 32, log2_range=(-6.0, 6.0)).double()
    x[..., 0, :, :32] = 1.5  # block max in [1, 2): scale 2^6, step 1/64
    steps = torch.arange(32, dtype=torch.float64)
    x[..., 0, 0, 1:32] = ((steps[1:] % 13) - 6 + 0.5) / 64  # exact ties, both signs
    if t > 1:
        x[:, 1, 0, :32] = 1.999  # 127.94 -> 128 -> clamped to 127
        x[:, 1, -1, :32] = 0.0  # an all-zero block
    return x.to(dtype)


APPEND_STORAGES = [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                   ("float16", torch.float16), ("mxint8", torch.float32),
                   ("mxint8", torch.bfloat16), ("mxint8", torch.float16)]


@pytest.mark.parametrize("t", [1, 16])
@pytest.mark.parametrize("page_size", [None, 1, 7], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("storage,dtype", APPEND_STORAGES, ids=lambda x: str(x))
def test_kv_cache_append_exact(device, isa, storage, dtype, page_size, t):
    need_kernel_dtype(device, dtype)
    if isa == "scalar" and storage != "mxint8":
        pytest.skip("a float cache write is a copy on every path")
    b, hkv, cap = 4, 3, 37
    d = head_dim_on(device, 80 if t == 1 else 64)
    starts = [0, cap - t, int(torch.randint(0, cap - t + 1, ())),
              int(torch.randint(0, cap - t + 1, ()))]
    mx = storage == "mxint8"
    if mx:
        k = tie_data(b, t, hkv, d, dtype)
        v = randn_blocks((b, t, hkv, d), 32, dtype, log2_range=(-10.0, 10.0))
    else:
        k = randn((b, t, hkv, d), dtype)
        v = randn((b, hkv, t, d), dtype).transpose(1, 2)  # non-contiguous
    ecols = -(-d // 32)
    if mx:
        parts = [torch.full((b, cap, hkv, d), MANT_POISON, dtype=torch.int8),
                 torch.full((b, cap, hkv, ecols), EXP_POISON, dtype=torch.uint8)] * 2
        parts = [p.clone() for p in parts]
        poisons = [MANT_POISON, EXP_POISON] * 2
    else:
        parts = [torch.full((b, cap, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
        poisons = [float("nan")] * 2
    table = None
    if page_size is not None:
        parts, table = to_paged(parts, [cap] * b, page_size, poisons)
    # the expected bytes, written by hand
    expected = [p.clone() for p in parts]
    new = [*ref.bfp_quantize(k, 8, 32, False), *ref.bfp_quantize(v, 8, 32, False)] if mx \
        else [k, v]
    for i, s in enumerate(starts):
        for j in range(t):
            pos = s + j
            if table is None:
                idx = (i, pos)
            else:
                idx = (int(table[i, pos // page_size]), pos % page_size)
            for e, n in zip(expected, new, strict=True):
                e[idx] = n[i, j]
    dev = [p.to(device) for p in parts]
    if mx:
        caches = (as_bfp(dev[0], dev[1], dtype), as_bfp(dev[2], dev[3], dtype))
    else:
        caches = tuple(dev)
    ops.kv_cache_append(*caches, k.to(device), v.to(device),
                        torch.tensor(starts, dtype=torch.int32, device=device),
                        None if table is None else table.to(device))
    names = ["k mantissa", "k exponent", "v mantissa", "v exponent"] if mx else ["k", "v"]
    for name, a, e in zip(names, dev, expected, strict=True):
        ab, eb = bits(a), bits(e)
        if not torch.equal(ab, eb):
            diff = (ab != eb).reshape(*e.shape, -1).any(-1).nonzero()[:5].tolist()
            raise AssertionError(f"{name} cache: bytes differ at {diff} (start_pos {starts}, "
                                 f"T {t}); first: got {a.cpu()[tuple(diff[0])].tolist()}, "
                                 f"want {e[tuple(diff[0])].tolist()}")


def test_kv_cache_append_then_decode(device):
    """Appending the new tokens then decoding = decoding over a cache that already held them."""
    dtype = KERNEL_DTYPES[device.type][-1]
    b, hkv, g, d, cap, lq = 3, 2, 4, 64, 50, 4
    lengths = [4, 23, 50]
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    k_new = torch.stack([kc[i, n - lq:n] for i, n in enumerate(lengths)])
    v_new = torch.stack([vc[i, n - lq:n] for i, n in enumerate(lengths)])
    kc2, vc2 = kc.clone(), vc.clone()
    for i, n in enumerate(lengths):
        kc2[i, n - lq:] = float("nan")
        vc2[i, n - lq:] = float("nan")
    kc2, vc2 = kc2.to(device), vc2.to(device)
    start = torch.tensor([n - lq for n in lengths], dtype=torch.int32, device=device)
    ops.kv_cache_append(kc2, vc2, k_new.to(device), v_new.to(device), start)
    q = randn((b, lq, hkv * g, d), dtype, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    a = ops.decode_attention(q, kc2, vc2, seqlens, return_lse=True)
    e = ops.decode_attention(q, kc.to(device), vc.to(device), seqlens, return_lse=True)
    assert torch.equal(a[0], e[0]) and torch.equal(a[1], e[1])


# ---------------------------------------------------------------------------------------
# KVCache
# ---------------------------------------------------------------------------------------
def dense_check(out, q, ks, vs, dtype, mx: bool, what: str, scale=None):
    """out [1, T, H, D] against causal attention of q over all tokens ks/vs [1, S, Hkv, D]
    (MXINT8 storage: over their quantised values)."""
    if mx:
        ks, vs = (ref.bfp_dequantize(*ref.bfp_quantize(t, 8, 32, False), 8, 32, t.shape[-1],
                                     torch.float64) for t in (ks, vs))
    q, ks, vs = q.cpu(), ks.cpu(), vs.cpu()
    o64, _ = ref.attention_fwd(q.double(), ks.double(), vs.double(), causal=True,
                               softmax_scale=scale)
    pt, _ = ref.attention_fwd(q, ks.to(dtype), vs.to(dtype), causal=True, softmax_scale=scale,
                              upcast=False)
    pt32, _ = ref.attention_fwd(q.float(), ks.float(), vs.float(), causal=True,
                                softmax_scale=scale, upcast=False)
    check_2x(out, o64, [pt, pt32.to(dtype)], dtype, what)


KV_CONFIGS = [("native", torch.float32, None), ("native", torch.bfloat16, 7),
              ("native", torch.float16, None), ("mxint8", torch.float32, None),
              ("mxint8", torch.bfloat16, 4)]


def kv_config(device, storage, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.float16
    return storage, dtype


@pytest.mark.parametrize("storage,dtype,page_size", KV_CONFIGS, ids=str)
def test_kvcache_prefill_decode_matches_dense(device, storage, dtype, page_size):
    storage, dtype = kv_config(device, storage, dtype)
    n_layers, b, hkv, g, d, max_seq = 2, 3, 2, 4, head_dim_on(device, 80), 40
    cache = KVCache(n_layers, b, max_seq, hkv, d, dtype, device, storage, page_size)
    ks = [[] for _ in range(n_layers)]
    vs = [[] for _ in range(n_layers)]
    total = 0
    for t in (6, 1, 16):
        pos = cache.prepare(t)
        assert torch.equal(pos.cpu(), (total + torch.arange(t)).expand(b, t)), "positions"
        for layer in range(n_layers):
            k, v = randn((b, t, hkv, d), dtype), randn((b, t, hkv, d), dtype)
            q = randn((b, t, hkv * g, d), dtype)
            ks[layer].append(k)
            vs[layer].append(v)
            cache.append(layer, k.to(device), v.to(device))
            out = cache.attend(layer, q.to(device))
            assert out.dtype == dtype and out.shape == q.shape
            kall, vall = torch.cat(ks[layer], 1), torch.cat(vs[layer], 1)
            dense_check(out, q, kall, vall, dtype, storage == "mxint8",
                        f"step of {t} at {total}, layer {layer}")
            if storage == "native" and dtype == torch.float32:
                dense = ops.attention(q.to(device), kall.to(device), vall.to(device),
                                      causal=True)
                torch.testing.assert_close(out, dense, rtol=0, atol=4e-5)
        assert cache.lengths == [total] * b, "lengths change only at commit"
        cache.commit()
        total += t
        assert cache.lengths == [total] * b
        assert cache.seqlens.tolist() == [total] * b and cache.seqlens.dtype == torch.int32


def run_steps(cache, steps):
    """Feed (k, v, q) per layer per step; returns the attend outputs of the last step."""
    outs = None
    for step in steps:
        cache.prepare(step[0][0].shape[1])
        outs = []
        for layer, (k, v, q) in enumerate(step):
            cache.append(layer, k, v)
            outs.append(cache.attend(layer, q))
        cache.commit()
    return outs


def make_step(n_layers, b, t, hkv, g, d, dtype, device):
    return [tuple(randn((b, t, h, d), dtype, device) for h in (hkv, hkv, hkv * g))
            for _ in range(n_layers)]


def take(step, lo, hi):
    return [tuple(x[:, lo:hi] for x in layer) for layer in step]


@pytest.mark.parametrize("storage,dtype,page_size", KV_CONFIGS, ids=str)
def test_kvcache_rollback_equals_never_appended(device, storage, dtype, page_size):
    storage, dtype = kv_config(device, storage, dtype)
    n_layers, b, hkv, g, d, max_seq = 2, 3, 2, 4, 64, 32
    args = (n_layers, b, max_seq, hkv, d, dtype, device, storage, page_size)
    prefill = make_step(n_layers, b, 9, hkv, g, d, dtype, device)
    draft = make_step(n_layers, b, 4, hkv, g, d, dtype, device)
    nxt = make_step(n_layers, b, 3, hkv, g, d, dtype, device)
    a = KVCache(*args)
    run_steps(a, [prefill, draft])
    a.rollback(11)  # keep the first 2 draft tokens
    assert a.lengths == [11] * b
    out_a = run_steps(a, [nxt])
    never = KVCache(*args)
    out_b = run_steps(never, [prefill, take(draft, 0, 2), nxt])
    for layer in range(n_layers):
        assert torch.equal(out_a[layer], out_b[layer]), f"layer {layer}"
    # reset, then the same stream as a fresh cache
    a.reset()
    assert a.lengths == [0] * b and a.seqlens.tolist() == [0] * b
    out_r = run_steps(a, [prefill, take(draft, 0, 2), nxt])
    for layer in range(n_layers):
        assert torch.equal(out_r[layer], out_b[layer]), f"after reset, layer {layer}"


@pytest.mark.parametrize("storage,dtype,page_size", KV_CONFIGS, ids=str)
def test_kvcache_rollback_per_sequence(device, storage, dtype, page_size):
    storage, dtype = kv_config(device, storage, dtype)
    n_layers, b, hkv, g, d, max_seq = 2, 3, 2, 4, 64, 32
    cache = KVCache(n_layers, b, max_seq, hkv, d, dtype, device, storage, page_size)
    prefill = make_step(n_layers, b, 9, hkv, g, d, dtype, device)
    draft = make_step(n_layers, b, 4, hkv, g, d, dtype, device)
    nxt = make_step(n_layers, b, 2, hkv, g, d, dtype, device)
    run_steps(cache, [prefill, draft])
    keep = [10, 13, 9]  # accept 1, 4 and 0 draft tokens
    cache.rollback(torch.tensor(keep))
    assert cache.lengths == keep and cache.seqlens.tolist() == keep
    out = run_steps(cache, [nxt])
    assert cache.lengths == [n + 2 for n in keep]
    for layer in range(n_layers):
        for i, n in enumerate(keep):
            ks = torch.cat([prefill[layer][0][i:i + 1], draft[layer][0][i:i + 1, : n - 9],
                            nxt[layer][0][i:i + 1]], 1)
            vs = torch.cat([prefill[layer][1][i:i + 1], draft[layer][1][i:i + 1, : n - 9],
                            nxt[layer][1][i:i + 1]], 1)
            dense_check(out[layer][i:i + 1], nxt[layer][2][i:i + 1], ks, vs, dtype,
                        storage == "mxint8", f"layer {layer}, sequence {i} kept {n}")


def test_kvcache_misuse_errors():
    cache = KVCache(2, 2, 16, 1, 32)
    k = torch.randn(2, 1, 1, 32)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.append(0, k, k)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.attend(0, k)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.prepare(17)
    cache.prepare(8)
    with pytest.raises(RuntimeError, match="commit"):
        cache.prepare(1)
    with pytest.raises(ValueError, match="layer"):
        cache.append(2, torch.randn(2, 8, 1, 32), torch.randn(2, 8, 1, 32))
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, k, k)
    with pytest.raises(RuntimeError, match="commit"):
        cache.rollback(0)
    cache.commit()
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.prepare(9)
    with pytest.raises(ValueError, match="rollback length of sequence 1"):
        cache.rollback([8, 9])
    with pytest.raises(ValueError, match="lengths"):
        cache.rollback([1, 2, 3])
    with pytest.raises(ValueError, match="storage"):
        KVCache(1, 1, 8, 1, 32, storage="fp8")
    with pytest.raises(ValueError, match="num_pages"):
        KVCache(1, 1, 8, 1, 32, num_pages=3)


def used_pages(cache) -> list[list[int]]:
    bt = cache.block_table.cpu()
    return [bt[i, : -(-n // cache.page_size)].tolist() for i, n in enumerate(cache.lengths)]


def test_kvcache_page_pool(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    cache = KVCache(2, 2, 16, 1, 64, dtype, device, page_size=4, num_pages=5)
    step = make_step(2, 2, 8, 1, 2, 64, dtype, device)
    run_steps(cache, [step])  # 2 + 2 pages
    pages = used_pages(cache)
    assert len(set(pages[0] + pages[1])) == 4 and all(0 <= p < 5 for p in pages[0] + pages[1])
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(4)  # needs 2 more, 1 free
    assert cache.lengths == [8, 8]
    cache.rollback([4, 8])  # sequence 0 gives a page back
    run_steps(cache, [make_step(2, 2, 4, 1, 2, 64, dtype, device)])  # needs 2: fits now
    pages = used_pages(cache)
    assert len(set(pages[0] + pages[1])) == 5, f"pages shared between sequences: {pages}"
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(1)
    cache.reset()
    assert cache.lengths == [0, 0]
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(16)  # 8 pages > 5
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(9)  # 3 + 3 pages > 5
    assert cache.lengths == [0, 0]
    run_steps(cache, [make_step(2, 2, 8, 1, 2, 64, dtype, device)])  # 2 + 2 pages


def test_kvcache_page_pool_reset_returns_pages(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    cache = KVCache(1, 2, 32, 1, 64, dtype, device, page_size=4, num_pages=6)
    for _ in range(3):  # without returning pages the second round runs out
        run_steps(cache, [make_step(1, 2, 12, 1, 2, 64, dtype, device)])
        assert len({p for s in used_pages(cache) for p in s}) == 6
        cache.reset()
    run_steps(cache, [make_step(1, 2, 12, 1, 2, 64, dtype, device)])
    cache.rollback([1, 12])
    run_steps(cache, [make_step(1, 2, 4, 1, 2, 64, dtype, device)])  # 2 + 4 pages: fits
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(1)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
def test_kvcache_mxint8_close_to_native(device, page_size):
    dtype = KERNEL_DTYPES[device.type][-1]
    n_layers, b, hkv, g, d = 2, 2, 2, 4, 128
    native = KVCache(n_layers, b, 64, hkv, d, dtype, device, "native", page_size)
    mx = KVCache(n_layers, b, 64, hkv, d, dtype, device, "mxint8", page_size)
    for t in (37, 1, 4):
        step = make_step(n_layers, b, t, hkv, g, d, dtype, device)
        for layer, (o_n, o_m) in enumerate(zip(run_steps(native, [step]), run_steps(mx, [step]),
                                               strict=True)):
            assert rel_err(o_m, o_n) < 2e-2, f"step {t}, layer {layer}"


@pytest.mark.parametrize("page_size", [None, 8])
def test_kvcache_nbytes(page_size):
    for dtype, bytes_per in ((torch.float16, 16), (torch.bfloat16, 16), (torch.float32, 32)):
        native = KVCache(3, 2, 64, 2, 128, dtype, "cpu", "native", page_size)
        mx = KVCache(3, 2, 64, 2, 128, dtype, "cpu", "mxint8", page_size)
        assert native.nbytes() * 8.25 == mx.nbytes() * bytes_per, (dtype, native.nbytes(),
                                                                   mx.nbytes())


# ---------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------
def _decode_samples(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    b, hkv, g, d, cap = 3, 2, 4, 64, 40
    lengths = [0, 17, 40]
    kc, vc = (c.to(device) for c in float_cache(b, cap, hkv, d, dtype, lengths))
    q = randn((b, 4, hkv * g, d), dtype, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    (km, ke), (vm, ve) = mx_cache(b, cap, hkv, d, lengths)
    (pk, pv), table = to_paged([kc.cpu(), vc.cpu()], lengths, 16, [float("nan")] * 2)
    mx = [t.to(device) for t in (km, vm, ke, ve)]
    return [
        (q, kc, vc, seqlens, 0.125, None, None, None),
        (q[:, :1], pk.to(device), pv.to(device), seqlens, 0.3, table.to(device), None, None),
        (q, mx[0], mx[1], seqlens, 0.125, None, mx[2], mx[3]),
    ]


def test_opcheck_decode_attention(device):
    for args in _decode_samples(device):
        torch.library.opcheck(torch.ops.llmcore.decode_attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_opcheck_kv_cache_append(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    b, hkv, d, cap, t = 3, 2, 64, 40, 5
    start = torch.tensor([0, 7, 35], dtype=torch.int32, device=device)
    k, v = (randn((b, t, hkv, d), dtype, device) for _ in range(2))
    kc, vc = (randn((b, cap, hkv, d), dtype, device) for _ in range(2))
    km, vm = (torch.zeros((b, cap, hkv, d), dtype=torch.int8, device=device) for _ in range(2))
    ke, ve = (torch.zeros((b, cap, hkv, 2), dtype=torch.uint8, device=device)
              for _ in range(2))
    (pk, pv), table = to_paged([kc.cpu(), vc.cpu()], [cap] * b, 8, [float("nan")] * 2)
    for args in ((kc, vc, k, v, start, None, None, None),
                 (pk.to(device), pv.to(device), k, v, start, table.to(device), None, None),
                 (km, vm, k, v, start, None, ke, ve)):
        torch.library.opcheck(torch.ops.llmcore.kv_cache_append.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    schema = torch.ops.llmcore.kv_cache_append.default._schema
    written = {a.name: a.is_write for a in schema.arguments if a.alias_info is not None}
    assert written == {"k_cache": True, "v_cache": True, "k_exponent": True,
                       "v_exponent": True}, written


def test_torch_compile_decode(device):
    torch._dynamo.reset()
    samples = _decode_samples(device)

    def f(q, kc, vc, seqlens, scale, table, ke, ve):
        out, lse = torch.ops.llmcore.decode_attention(q, kc, vc, seqlens, scale, table, ke, ve)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True)
    for args in samples[:2]:
        e_out, e_lse = f(*args)
        c_out, c_lse = compiled(*args)
        torch.testing.assert_close(c_out, e_out, rtol=0, atol=0)
        torch.testing.assert_close(c_lse, e_lse, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------
def _bad_base(device, dtype=None):
    dtype = dtype or KERNEL_DTYPES[device.type][-1]
    b, hkv, g, d, cap = 2, 2, 4, 64, 20
    kc, vc = (randn((b, cap, hkv, d), dtype, device) for _ in range(2))
    q = randn((b, 1, hkv * g, d), dtype, device)
    seqlens = torch.tensor([3, 20], dtype=torch.int32, device=device)
    return q, kc, vc, seqlens


def test_decode_attention_bad_inputs(device):
    q, kc, vc, sl = _bad_base(device)
    i32 = dict(dtype=torch.int32, device=device)
    pk, pv = kc.reshape(8, 5, 2, 64), vc.reshape(8, 5, 2, 64)
    table = torch.arange(8, **i32).reshape(2, 4)
    bad = [
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([3, 21], **i32))),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([-1, 2], **i32))),
        ("cache_seqlens", dict(cache_seqlens=sl.long())),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([3], **i32))),
        ("cache_seqlens", dict(cache_seqlens=sl.reshape(2, 1))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=torch.tensor(
            [[0, 1, 2, 3], [4, 5, 6, 8]], **i32))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=torch.tensor(
            [[-1, 1, 2, 3], [4, 5, 6, 7]], **i32))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table.long())),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table[:1])),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table.reshape(8))),
        ("cache_seqlens", dict(k_cache=pk, v_cache=pv, block_table=table[:, :3])),  # cap 15
        ("head_dim", dict(k_cache=kc[..., :32].contiguous(), v_cache=vc[..., :32].contiguous())),
        ("dtype", dict(k_cache=kc.double(), v_cache=vc.double())),
        ("v_cache", dict(v_cache=vc[:, :10].contiguous())),
        ("kv_heads", dict(q=torch.cat([q, q[:, :, :1]], 2))),
        (r"\bq\b", dict(q=q.double(), k_cache=kc.double(), v_cache=vc.double())),
        (r"\bq\b", dict(q=q[0])),
        ("k_cache", dict(k_cache=kc[0])),
        ("batch", dict(k_cache=kc[:1], v_cache=vc[:1])),
    ]
    m4, e4 = ref.bfp_quantize(kc.cpu(), 4, 32, False)
    bad.append(("mxint8", dict(k_cache=BFPTensor(m4.to(device), e4.to(device), "mxint4",
                                                 tuple(kc.shape)), v_cache=vc)))
    m8, e8 = ref.bfp_quantize(kc.cpu(), 8, 32, False)
    bad.append(("v_cache", dict(k_cache=as_bfp(m8.to(device), e8.to(device)), v_cache=vc)))
    for pattern, over in bad:
        args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=sl) | over
        with pytest.raises((ValueError, TypeError), match=pattern):
            ops.decode_attention(**args)


def test_kv_cache_append_bad_inputs(device):
    q, kc, vc, _ = _bad_base(device)
    i32 = dict(dtype=torch.int32, device=device)
    k = randn((2, 3, 2, 64), q.dtype, device)
    start = torch.tensor([0, 17], **i32)
    pk, pv = kc.reshape(8, 5, 2, 64), vc.reshape(8, 5, 2, 64)
    table = torch.arange(8, **i32).reshape(2, 4)
    bad = [
        ("start_pos", dict(start_pos=torch.tensor([0, 18], **i32))),
        ("start_pos", dict(start_pos=torch.tensor([-1, 0], **i32))),
        ("start_pos", dict(start_pos=start.long())),
        ("start_pos", dict(start_pos=start[:1])),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=torch.tensor(
            [[0, 1, 2, 3], [4, 5, 6, 9]], **i32))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table.long())),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table[:1])),
        ("start_pos", dict(k_cache=pk, v_cache=pv, block_table=table[:, :3])),
        ("head_dim", dict(k=k[..., :32], v=k[..., :32])),
        ("dtype", dict(k=k.float() if k.dtype != torch.float32 else k.half(),
                       v=k.float() if k.dtype != torch.float32 else k.half())),
        ("kv heads", dict(k=k[:, :, :1], v=k[:, :, :1])),
        (r"\bk\b", dict(k=k.double(), v=k.double())),
        (r"\bv\b", dict(v=k[:, :2])),
        ("batch", dict(k_cache=kc[:1], v_cache=vc[:1])),
    ]
    m4, e4 = ref.bfp_quantize(kc.cpu(), 4, 32, False)
    bad.append(("mxint8", dict(k_cache=BFPTensor(m4.to(device), e4.to(device), "mxint4",
                                                 tuple(kc.shape)),
                               v_cache=BFPTensor(m4.to(device), e4.to(device), "mxint4",
                                                 tuple(kc.shape)))))
    for pattern, over in bad:
        args = dict(k_cache=kc, v_cache=vc, k=k, v=k, start_pos=start) | over
        before = [bits(t) for t in (kc, vc)]
        with pytest.raises((ValueError, TypeError), match=pattern):
            ops.kv_cache_append(**args)
        assert all(torch.equal(b, bits(t)) for b, t in zip(before, (kc, vc), strict=True)), \
            f"a rejected append ({pattern}) wrote to the cache"


def test_binding_checks(device):
    """The ops themselves (no Python face) reject bad shapes and dtypes with a message that
    names the argument (STYLE "Check at the boundary"). Every case is tried; all misses are
    reported together."""
    need_kernel("decode_attention", device)
    need_kernel("kv_cache_append", device)
    q, kc, vc, sl = _bad_base(device)
    s = 0.125
    i32 = dict(dtype=torch.int32, device=device)
    k = randn((2, 3, 2, 64), q.dtype, device)
    start = torch.tensor([0, 1], **i32)
    attend = torch.ops.llmcore.decode_attention
    append = torch.ops.llmcore.kv_cache_append
    cases = [
        ("cache_seqlens", attend, (q, kc, vc, sl.long(), s, None, None, None)),
        ("cache_seqlens", attend, (q, kc, vc, sl[:1], s, None, None, None)),
        ("block_table", attend, (q, kc, vc, sl, s, sl.reshape(2, 1).long(), None, None)),
        ("block_table", attend, (q, kc, vc, sl, s, torch.zeros((1, 4), **i32), None, None)),
        ("head_dim|k_cache", attend, (q, kc[..., :32].contiguous(), vc[..., :32].contiguous(),
                                      sl, s, None, None, None)),
        ("k_cache|dtype", attend, (q, kc.double(), vc.double(), sl, s, None, None, None)),
        ("exponent", attend, (q, kc.to(torch.int8), vc.to(torch.int8), sl, s, None, None,
                              None)),
        ("kv_heads", attend, (q[:, :, :3], kc, vc, sl, s, None, None, None)),
        ("start_pos", append, (kc, vc, k, k, start.long(), None, None, None)),
        ("block_table", append, (kc, vc, k, k, start, start.reshape(2, 1).long(), None, None)),
        ("head_dim|k_cache", append, (kc, vc, k[..., :32], k[..., :32], start, None, None,
                                      None)),
    ]
    misses = []
    for pattern, op, args in cases:
        try:
            op(*args)
        except (RuntimeError, ValueError, TypeError) as e:
            if not re.search(pattern, str(e)):
                misses.append(f"{op.__name__} expected /{pattern}/, got: {str(e)[:200]}")
        else:
            misses.append(f"{op.__name__} accepted a bad input (expected /{pattern}/)")
    assert not misses, "\n".join(misses)


UNCHECKED_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    from llmcore import ops
    from llmcore.ops import BFPTensor

    dev = torch.device(sys.argv[1])
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    torch.manual_seed(0)
    b, cap, hkv, d = 2, 24, 2, 64
    q = torch.randn(b, 2, 4, d).to(dtype).to(dev)
    k_new = torch.randn(b, 3, hkv, d).to(dtype).to(dev)
    results = []

    def guarded(shape, tdtype, poison, fill):
        # the cache is the middle of a buffer whose first and last entries are poison
        big = torch.full((shape[0] + 2, *shape[1:]), poison, dtype=tdtype)
        big[1:-1] = fill(shape)
        big = big.to(dev)
        return big, big[1:-1]

    def record(name, fn, bigs):
        print("CASE", name, flush=True)
        before = [bb.clone() for bb in bigs]
        try:
            res = fn()
        except (RuntimeError, ValueError, IndexError) as e:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            results.append(dict(name=name, error=f"{type(e).__name__}: {e}"[:300]))
            return
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ok = True
        if res is not None:
            out, lse = res
            ok = bool(torch.isfinite(out).all()) and not bool(torch.isnan(lse).any())
        guards = all(torch.equal(x[0].view(torch.uint8), y[0].view(torch.uint8)) and
                     torch.equal(x[-1].view(torch.uint8), y[-1].view(torch.uint8))
                     for x, y in zip(bigs, before))
        results.append(dict(name=name, finite=ok, guards_intact=guards))

    for layout in ("contiguous", "paged"):
        for storage in ("float", "mxint8"):
            shape = (b, cap, hkv, d) if layout == "contiguous" else (6, 8, hkv, d)
            if storage == "float":
                bk, ck = guarded(shape, dtype, float("nan"), lambda s: torch.randn(s))
                bv, cv = guarded(shape, dtype, float("nan"), lambda s: torch.randn(s))
                bigs, kc, vc = [bk, bv], ck, cv
            else:
                parts = []
                for _ in range(2):
                    bm, m = guarded(shape, torch.int8, -128,
                                    lambda s: torch.randint(-127, 128, s, dtype=torch.int8))
                    be, e = guarded((*shape[:-1], d // 32), torch.uint8, 255,
                                    lambda s: torch.randint(100, 140, s, dtype=torch.uint8))
                    parts += [bm, m, be, e]
                bigs = [parts[0], parts[2], parts[4], parts[6]]
                kc = BFPTensor(parts[1], parts[3], "mxint8", shape, dtype)
                vc = BFPTensor(parts[5], parts[7], "mxint8", shape, dtype)
            tables = [None]
            if layout == "paged":
                good = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev)
                tables = [good]
                for bad in (-1, 6, 2**30, -2**31):
                    t = good.clone()
                    t[1, 1] = bad
                    tables.append(t)
            for ti, table in enumerate(tables):
                lens = [[3, cap + 5], [-3, 5], [2**30, 1], [2**31 - 1, 0]] if ti == 0 else \
                    [[3, 12]]
                for ln in lens:
                    sl = torch.tensor(ln, dtype=torch.int32, device=dev)
                    name = f"{layout}/{storage}/table{ti}/decode lengths {ln}"
                    record(name, lambda: ops.decode_attention(
                        q, kc, vc, sl, block_table=table, return_lse=True, validate=False), bigs)
                starts = [[0, cap - 1], [-2, 0], [2**30, 0], [2**31 - 2, 0]] if ti == 0 else \
                    [[0, 6]]
                for st in starts:
                    sp = torch.tensor(st, dtype=torch.int32, device=dev)
                    name = f"{layout}/{storage}/table{ti}/append start {st}"
                    record(name, lambda: ops.kv_cache_append(
                        kc, vc, k_new, k_new, sp, block_table=table, validate=False), bigs)
    print("RESULTS " + json.dumps(results))
""")


def test_unvalidated_inputs_stay_in_bounds(device):
    """validate=False with lengths / start positions / page ids out of range: no crash, no
    read or write outside the cache (its neighbours in memory are poison and stay intact;
    the outputs stay finite); a clear exception is also acceptable. Run in a subprocess so
    a crash is a failure, not the end of the test run."""
    proc = subprocess.run([sys.executable, "-c", UNCHECKED_SCRIPT, device.type],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"the process died (rc {proc.returncode}):\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    problems = []
    for r in json.loads(line[len("RESULTS "):]):
        if "error" in r:
            if "illegal memory access" in r["error"] or "CUDA error" in r["error"]:
                problems.append(f"{r['name']}: {r['error']}")
        elif not (r["finite"] and r["guards_intact"]):
            problems.append(f"{r['name']}: finite output {r['finite']}, memory around the "
                            f"cache intact {r['guards_intact']}")
    assert not problems, "\n".join(problems)
