"""Seeded fuzzing of every op under each CPU kernel path: random shapes (empty ones
included), dtypes, strides, lengths, page tables, scales and non-finite values, some of
them invalid. Each call must either raise a clear error (ValueError / TypeError /
RuntimeError with a message) or match the reference (NaN where the reference has NaN).
A fixed seed per test keeps failures reproducible; the whole module runs in seconds.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import assert_close_nan

from llmcore import ops
from llmcore import reference as ref

CASES = 24  # per test and CPU path
TOL = {torch.float32: 2e-4, torch.bfloat16: 4e-2}
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError)


def _clear_error_or(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None when it raised a clear error (a message, a known type)."""
    try:
        return fn(*args, **kwargs)
    except CLEAR_ERRORS as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None


def _tensor(rng: random.Random, shape, dtype, nonfinite: bool = True,
            specials=(float("nan"), float("inf"), float("-inf"))) -> torch.Tensor:
    """Normal values of ``shape`` with a random memory layout (a slice of a larger buffer,
    possibly with the last two axes swapped), sometimes with a NaN or Inf inside."""
    shape = list(shape)
    if len(shape) >= 2 and rng.random() < 0.3:  # non-contiguous rows: transposed storage
        buf = torch.randn(*shape[:-2], shape[-1], shape[-2]).to(dtype)
        x = buf.transpose(-1, -2)
    else:
        pad = rng.choice([0, 0, 3])
        buf = torch.randn(*shape[:-1], shape[-1] + pad).to(dtype) if shape else torch.randn(())
        x = buf[..., :shape[-1]] if shape else buf
    if nonfinite and x.numel() and rng.random() < 0.25:
        idx = tuple(rng.randrange(s) for s in x.shape)
        x[idx] = rng.choice(specials)
    return x


def _mag(x: torch.Tensor) -> float:
    """max(1, the largest finite |x|)."""
    finite = x[torch.isfinite(x)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def _tol(dtype, x: torch.Tensor) -> float:
    return TOL[dtype] * _mag(x)


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_attention(seed, cpu_isa):
    rng = random.Random(f"attention-{seed}-{cpu_isa}")
    for _ in range(CASES):
        dtype = rng.choice([torch.float32, torch.bfloat16])
        b, sq, sk = rng.choice([0, 1, 2]), rng.choice([0, 1, 5, 17, 70]), rng.choice([0, 1, 9, 66])
        hkv, group, d = rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice([1, 7, 16, 33])
        causal = rng.random() < 0.5
        scale = rng.choice([None, None, 0.3, -1.0, float("nan")])
        q = _tensor(rng, (b, sq, hkv * group, d), dtype)
        k = _tensor(rng, (b, sk, hkv, d), dtype)
        v = _tensor(rng, (b, sk, hkv, d), dtype)
        if rng.random() < 0.1:  # an invalid call: must be refused
            k = k[..., : max(d - 1, 0)]
        got = _clear_error_or(ops.attention, q, k, v, causal, scale, return_lse=True)
        if got is None:
            continue
        want = ref.attention_fwd(q, k, v, causal, scale)
        assert_close_nan(got[0], want[0], _tol(dtype, want[0]),
                         f"attention {dtype} {list(q.shape)} {list(k.shape)} {causal} {scale}")
        assert_close_nan(got[1], want[1], 1e-3 * _mag(want[1]), "lse")


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_attention_varlen_and_backward(seed, cpu_isa):
    rng = random.Random(f"varlen-{seed}-{cpu_isa}")
    for _ in range(CASES // 2):
        n = rng.choice([1, 2, 4])
        lq = [rng.choice([0, 1, 3, 20]) for _ in range(n)]
        lk = [rng.choice([0, 1, 6, 40]) for _ in range(n)]
        hkv, group, d = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([4, 16, 24])
        causal = rng.random() < 0.5
        cq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
        ck = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
        # NaN only: the gradient through an Inf (inf - inf in dS) is not pinned down
        q, k, v = (_tensor(rng, (n_rows, h, d), torch.float32, specials=(float("nan"),))
                   .requires_grad_() for n_rows, h in ((sum(lq), hkv * group), (sum(lk), hkv),
                                                       (sum(lk), hkv)))
        mq, mk = max(lq) + rng.choice([0, 2]), max(lk) + rng.choice([0, 3])
        if rng.random() < 0.15:
            mq = max(max(lq) - 1, 0) if max(lq) else mq  # too small: refused
        out = _clear_error_or(ops.attention_varlen, q, k, v, cq, ck, mq, mk, causal)
        if out is None:
            continue
        want = ref.attention_varlen_fwd(q.detach(), k.detach(), v.detach(), cq, ck, mq, mk,
                                        causal)[0]
        assert_close_nan(out, want, _tol(torch.float32, want), f"varlen {lq} {lk} {causal}")
        if out.numel() == 0:
            continue
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        exp = ref.attention_varlen_bwd(grad, q.detach(), k.detach(), v.detach(), None, None,
                                       cq, ck, mq, mk, causal, None)
        for name, g, w in zip("qkv", got, exp, strict=True):
            assert_close_nan(g, w, 10 * _tol(torch.float32, w), f"grad_{name} {lq} {lk}")


def _paged(rng, kc_dense: torch.Tensor, page: int):
    """The dense cache [B, cap, H, D] as pages in a random order plus its block table."""
    b, cap = kc_dense.shape[:2]
    per = -(-cap // page)
    order = list(range(b * per))
    rng.shuffle(order)
    pages = torch.zeros(b * per, page, *kc_dense.shape[2:], dtype=kc_dense.dtype)
    table = torch.tensor(order, dtype=torch.int32).view(b, per)
    for i in range(b):
        for j in range(per):
            rows = kc_dense[i, j * page:(j + 1) * page]
            pages[order[i * per + j], :rows.shape[0]] = rows
    return pages, table


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_decode(seed, cpu_isa):
    rng = random.Random(f"decode-{seed}-{cpu_isa}")
    for _ in range(CASES):
        dtype = rng.choice([torch.float32, torch.bfloat16])
        b, cap, q_len = rng.choice([1, 3]), rng.choice([1, 16, 50]), rng.choice([1, 2, 5])
        hkv, group, d = rng.choice([1, 2]), rng.choice([1, 4]), rng.choice([8, 32, 40])
        lens = [rng.choice([0, 1, cap, rng.randrange(cap + 1)]) for _ in range(b)]
        if rng.random() < 0.1:
            lens[0] = cap + 1  # past the capacity: refused
        seqlens = torch.tensor(lens, dtype=torch.int32)
        q = _tensor(rng, (b, q_len, hkv * group, d), dtype)
        kc = torch.randn(b, cap, hkv, d).to(dtype)
        vc = torch.randn(b, cap, hkv, d).to(dtype)
        kc[:, max(lens):], vc[:, max(lens):] = float("nan"), float("inf")  # never read
        table = None
        if rng.random() < 0.5:
            page = rng.choice([1, 4, 16])
            kc, table = _paged(rng, kc, page)
            vc = _paged_like(vc, table, page)
        got = _clear_error_or(ops.decode_attention, q, kc, vc, seqlens, block_table=table,
                              return_lse=True)
        if got is None:
            continue
        want = ref.decode_attention(q, kc, vc, seqlens, d ** -0.5, table)
        assert_close_nan(got[0], want[0], _tol(dtype, want[0]),
                         f"decode {dtype} lens {lens} q_len {q_len} paged {table is not None}")


def _paged_like(dense: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """``dense`` [B, cap, H, D] laid out in the pages ``table`` gives (garbage elsewhere)."""
    pages = torch.full((table.numel(), page, *dense.shape[2:]), float("nan"), dtype=dense.dtype)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            rows = dense[i, j * page:(j + 1) * page]
            pages[int(table[i, j]), :rows.shape[0]] = rows
    return pages


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_kv_cache_append(seed, cpu_isa):
    rng = random.Random(f"append-{seed}-{cpu_isa}")
    for _ in range(CASES):
        dtype = rng.choice([torch.float32, torch.bfloat16])
        b, cap, t = rng.choice([1, 2]), rng.choice([4, 20]), rng.choice([1, 3])
        hkv, d = rng.choice([1, 2]), rng.choice([8, 32, 33])
        start = [rng.randrange(-1, cap + 1) for _ in range(b)]
        k = _tensor(rng, (b, t, hkv, d), dtype).contiguous()
        v = _tensor(rng, (b, t, hkv, d), dtype).contiguous()
        kc, vc = torch.zeros(b, cap, hkv, d, dtype=dtype), torch.zeros(b, cap, hkv, d, dtype=dtype)
        kr, vr = kc.clone(), vc.clone()
        sp = torch.tensor(start, dtype=torch.int32)
        try:
            ops.kv_cache_append(kc, vc, k, v, sp)
        except ValueError as e:
            assert str(e)
            assert any(s < 0 or s + t > cap for s in start), f"refused valid start {start}"
            continue
        ref.kv_cache_append(kr, vr, k, v, sp)
        assert torch.equal(kc.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           kr.view(torch.int16 if dtype != torch.float32 else torch.int32))
        assert torch.equal(vc.isnan(), vr.isnan())


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_bfp(seed, cpu_isa):
    rng = random.Random(f"bfp-{seed}-{cpu_isa}")
    for _ in range(CASES):
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        fmt = rng.choice(["mxint8", "mxint4", "msfp16", "msfp12", "bfp16"])
        m, k, n = rng.choice([0, 1, 3]), rng.choice([1, 7, 32, 65]), rng.choice([1, 5, 16])
        x = _tensor(rng, (m, k), dtype)
        q = _clear_error_or(ops.bfp_quantize, x, fmt)
        if q is None:
            assert m == 0 or x.numel() == 0, f"refused valid {fmt} {list(x.shape)}"
            continue
        f = q.format
        want_m, want_e = ref.bfp_quantize(x, f.mantissa_bits, f.block_size, False)
        assert torch.equal(q.mantissa, want_m) and torch.equal(q.exponent, want_e), fmt
        w = ops.bfp_quantize(_tensor(rng, (n, k), torch.float32, nonfinite=False), fmt)
        xin = _tensor(rng, (m, k), dtype, nonfinite=False)
        y = _clear_error_or(ops.bfp_linear, xin, w)
        if y is None:
            continue
        want = xin.double() @ w.dequantize(torch.float32).double().T
        tol = (1e-3 * k if dtype == torch.float32 else 4e-2) * _mag(want)
        assert_close_nan(y, want, tol, f"bfp_linear {fmt} {dtype}")
