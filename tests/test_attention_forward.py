"""Fused attention, dense forward (docs/attention.md): ``ops.attention`` against the float64
reference in llmcore.reference.attention, edge cases, CPU kernel paths, strided inputs
and the drop-in for ``F.scaled_dot_product_attention``.

Tolerances: the 2x rule of tests/helpers/attention.py (docs/testing.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    need_kernel_dtype,
    randn,
)
from helpers.attention import (
    FWD_CASES,
    NO_KEY_REPS,
    OPS,
    SWEEP_HEAD_DIMS,
    Deterministic,
    assert_same,
    assert_zero_every_run,
    case_id,
    check_dense,
    grads_of,
    head_dim_for,
    make_qkv,
)

from llmcore import _ext, ops
from llmcore.reference.attention import causal_mask


@pytest.mark.parametrize("op", OPS)
def test_kernels_registered(op, device):
    assert _ext.available(), f"extension not loaded: {_ext.LOAD_ERROR}"
    assert _ext.has_op(op), f"the build lacks the schema llmcore::{op} (stale build?)"
    assert _ext.has_kernel(op, device), f"no {device.type} kernel registered for llmcore::{op}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=case_id)
def test_forward(case, dtype, device):
    need_kernel_dtype(device, dtype)
    b, sq, sk, h, hkv, causal, scale = case
    d = head_dim_for(device, FWD_CASES.index(case))
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device)
    check_dense(q, k, v, causal, scale, False, f"fwd {case_id(case)} d{d} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_head_dims(dtype, device):
    """Every head_dim the device's kernels take (CPU: any, odd ones included)."""
    need_kernel_dtype(device, dtype)
    for d in SWEEP_HEAD_DIMS[device.type]:
        q, k, v = make_qkv(1, 37, 53, 4, 2, d, dtype, device, requires_grad=True)
        check_dense(q, k, v, True, None, True, f"head_dim {d} {dtype}")


@pytest.mark.parametrize("scale", [0.0, -0.7, 2.5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_softmax_scale(scale, dtype, device):
    need_kernel_dtype(device, dtype)
    d = head_dim_for(device, 0)
    q, k, v = make_qkv(2, 33, 41, 4, 1, d, dtype, device, requires_grad=True)
    check_dense(q, k, v, False, scale, True, f"softmax_scale {scale} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_logits(dtype, device):
    """Scores far beyond exp's range (|s| ~ 100s): the running max must be subtracted."""
    need_kernel_dtype(device, dtype)
    d = head_dim_for(device, 0)
    q, k, v = make_qkv(2, 41, 67, 4, 2, d, dtype, device)
    q = (q.float() * 30).to(dtype).requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    check_dense(q, k, v, True, None, True, f"large logits {dtype}")


def test_default_scale_is_inverse_sqrt_head_dim(device):
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 1)
    q, k, v = make_qkv(2, 19, 23, 4, 2, d, dtype, device)
    a, la = ops.attention(q, k, v, causal=True, return_lse=True)
    b, lb = ops.attention(q, k, v, causal=True, softmax_scale=1.0 / math.sqrt(d),
                          return_lse=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fully_masked_rows(dtype, device):
    """Causal with seq_q > seq_k: query i < seq_q - seq_k sees no key -> out exactly 0,
    lse -inf, no NaN anywhere, zero grad for those rows of q."""
    need_kernel_dtype(device, dtype)
    b, sq, sk, h, hkv = 2, 45, 13, 4, 2
    d = head_dim_for(device, 2)
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=True)
    out, lse, (gq, gk, gv) = check_dense(q, k, v, True, None, True, f"masked rows {dtype}")
    dead = sq - sk
    assert torch.equal(out[:, :dead], torch.zeros_like(out[:, :dead])), "masked rows not 0"
    assert torch.all(lse[:, :, :dead] == float("-inf")), "lse of masked rows is not -inf"
    assert torch.isfinite(lse[:, :, dead:]).all()
    for n, t in (("out", out), ("dq", gq), ("dk", gk), ("dv", gv)):
        assert not torch.isnan(t).any(), f"NaN in {n}"
    assert torch.equal(gq[:, :dead], torch.zeros_like(gq[:, :dead])), "dq of masked rows != 0"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_empty_keys(causal, dtype, device):
    """seq_k == 0: every row sees nothing (out 0, lse -inf, dq 0, empty dk/dv)."""
    need_kernel_dtype(device, dtype)
    d = head_dim_for(device, 0)
    q, k, v = make_qkv(2, 9, 0, 4, 2, d, dtype, device, requires_grad=True)
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 4, 9) and torch.all(lse == float("-inf"))
    (out * randn(out.shape, dtype, device)).sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("causal", [False, True])
def test_empty_queries(causal, device):
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 0)
    q, k, v = make_qkv(2, 0, 11, 4, 2, d, dtype, device, requires_grad=True)
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 0)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_isa_paths(dtype, cpu_isa):
    """Each CPU kernel path (LLMCORE_CPU_ISA) against the reference."""
    device = torch.device("cpu")
    q, k, v = make_qkv(2, 70, 33, 4, 2, 80, dtype, device, requires_grad=True)
    check_dense(q, k, v, True, None, True, f"isa {cpu_isa} {dtype}")


def test_single_thread():
    """The CPU kernels with one thread (another work split) against the reference."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in KERNEL_DTYPES["cpu"]:
            q, k, v = make_qkv(1, 130, 200, 4, 2, 80, dtype, "cpu", requires_grad=True)
            check_dense(q, k, v, True, None, True, f"1 thread {dtype}")
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_noncontiguous_fused_qkv(dtype, device):
    """q, k, v = qkv[B, S, 3, H, D].unbind(2): same result (and grads) as contiguous."""
    need_kernel_dtype(device, dtype)
    b, s, h = 2, 97, 4
    d = head_dim_for(device, 1)
    qkv = randn((b, s, 3, h, d), dtype, device).requires_grad_(True)
    g = randn((b, s, h, d), dtype, device)
    with Deterministic():
        q, k, v = qkv.unbind(2)
        assert not q.is_contiguous()
        out = ops.attention(q, k, v, causal=True)
        (out * g).sum().backward()
        ref_out, (gq, gk, gv) = grads_of(
            lambda q_, k_, v_: ops.attention(q_, k_, v_, causal=True),
            [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)], g)
    assert_same(out, ref_out, "out")
    assert_same(qkv.grad, torch.stack([gq, gk, gv], dim=2), "d(qkv)")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_noncontiguous_transposed(dtype, device):
    """q/k/v given as [B, H, S, D].transpose(1, 2) (GQA), seq_q != seq_k."""
    need_kernel_dtype(device, dtype)
    b, sq, sk, h, hkv = 3, 31, 45, 8, 2
    d = head_dim_for(device, 2)
    qh = randn((b, h, sq, d), dtype, device).requires_grad_(True)
    kh = randn((b, hkv, sk, d), dtype, device).requires_grad_(True)
    vh = randn((b, hkv, sk, d), dtype, device).requires_grad_(True)
    g = randn((b, sq, h, d), dtype, device)
    with Deterministic():
        out, lse = ops.attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                 causal=True, return_lse=True)
        (out * g).sum().backward()
        leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_(True)
                  for t in (qh, kh, vh)]
        ref_out, ref_lse = ops.attention(*leaves, causal=True, return_lse=True)
        (ref_out * g).sum().backward()
    assert_same(out, ref_out, "out")
    assert_same(lse, ref_lse, "lse")
    for n, a, leaf in zip("qkv", (qh, kh, vh), leaves, strict=True):
        assert_same(a.grad, leaf.grad.transpose(1, 2), f"d{n}")


def test_noncontiguous_head_dim(device):
    """A strided last axis (every other element) still gives the contiguous result."""
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 1)
    big = [randn((2, 23, 4, 2 * d), dtype, device) for _ in range(3)]
    q, k, v = (t[..., ::2] for t in big)
    assert q.stride(-1) == 2
    out = ops.attention(q, k, v, causal=True)
    assert_same(out, ops.attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                    causal=True), "out with strided head_dim")


@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_interleave"])
@pytest.mark.parametrize("sq,sk,h,hkv,causal", [
    (33, 33, 4, 4, True), (17, 50, 8, 2, True), (50, 17, 4, 1, False), (1, 64, 8, 8, True),
    (64, 64, 8, 1, False)])
def test_matches_sdpa(sq, sk, h, hkv, causal, gqa, device):
    b, d = 2, 32
    dtype = torch.float32
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=True)
    g = randn(q.shape, dtype, device)
    out = ops.attention(q, k, v, causal=causal)
    (out * g).sum().backward()

    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    kk, vv, extra = ks, vs, {}
    if hkv != h:
        if gqa == "enable_gqa":
            extra["enable_gqa"] = True
        else:
            kk, vv = ks.repeat_interleave(h // hkv, 1), vs.repeat_interleave(h // hkv, 1)
    mask = causal_mask(sq, sk, device) if causal else None  # bottom-right aligned
    if causal and sq == sk:
        ref_out = F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, **extra)
    else:
        ref_out = F.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask, **extra)
    (ref_out.transpose(1, 2) * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_out.transpose(1, 2), **tol)
    for n, a, e in zip("qkv", (q, k, v), (qs, ks, vs), strict=True):
        torch.testing.assert_close(a.grad, e.grad.transpose(1, 2), **tol,
                                   msg=lambda m, n=n: f"d{n}: {m}")


def test_no_key_tile_rows_every_run(device):
    """Causal q 1024 over k 64 (fp16, D 128): rows 0..959 see no key, so the CUDA kernel's
    first query blocks have no key tile and stage their zero output in shared memory right
    after the copy of Q (a race if not ordered). On every one of 1000 runs those rows must
    be exactly 0 with lse -inf; the whole result to the 2x rule once."""
    dtype = torch.float16
    need_kernel_dtype(device, dtype)
    sq, sk, dead = 1024, 64, 1024 - 64
    q, k, v = make_qkv(1, sq, sk, 8, 8, 128, dtype, device)

    def run():
        out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
        return out[:, :dead], ~torch.isneginf(lse[:, :, :dead])

    assert_zero_every_run(run, NO_KEY_REPS[device.type], f"q{sq} k{sk} causal: rows with no key")
    check_dense(q, k, v, True, None, False, f"q{sq} k{sk} causal")
