"""Fused attention over packed variable-length sequences: ``ops.attention_varlen`` against
the float64 reference and against per-sequence dense calls.

Tolerances: the 2x rule of tests/helpers/attention.py (docs/testing.md).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    check_2x,
    need_kernel_dtype,
    randn,
)
from helpers.attention import (
    LENS_K,
    LENS_Q,
    NO_KEY_REPS,
    Deterministic,
    assert_same,
    assert_zero_every_run,
    cu_of,
    grads_of,
    head_dim_for,
    varlen_close,
)

from llmcore import ops
from llmcore import reference as ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_varlen(dtype, causal, device):
    need_kernel_dtype(device, dtype)
    h, hkv = 8, 2
    d = head_dim_for(device, 1)
    cq, ck = cu_of(LENS_Q, device), cu_of(LENS_K, device)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = randn((tq, h, d), dtype, device).requires_grad_(True)
    k = randn((tk, hkv, d), dtype, device).requires_grad_(True)
    v = randn((tk, hkv, d), dtype, device).requires_grad_(True)
    g = randn(q.shape, dtype, device)
    out, lse = ops.attention_varlen(q, k, v, cq, ck, max(LENS_Q), max(LENS_K), causal=causal,
                                    return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (h, tq) and lse.dtype == torch.float32, "lse must be [heads, total_q]"
    (out * g).sum().backward()
    grads = [t.grad for t in (q, k, v)]

    # float64 reference and PyTorch at the same precision
    res = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        ins = [t.double() for t in leaves] if upcast else leaves
        o, lg = ref.attention_varlen_fwd(*ins, cq.cpu(), ck.cpu(), max(LENS_Q), max(LENS_K),
                                         causal, None, upcast=upcast)
        (o * g.to(o.dtype)).sum().backward()
        res.append((o, lg, [t.grad if t.grad is not None else torch.zeros_like(t)
                            for t in leaves]))
    (o64, l64, g64), (opt, lpt, gpt) = res
    what = f"varlen {dtype} causal={causal}"
    check_2x(out, o64, opt, dtype, f"{what} out")
    check_2x(lse, l64, lpt, torch.float32, f"{what} lse")
    for n, a, e, p in zip("qkv", grads, g64, gpt, strict=True):
        check_2x(a, e, p, dtype, f"{what} d{n}")

    # per-sequence dense calls
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    cql, ckl = cq.tolist(), ck.tolist()
    for i in range(len(LENS_Q)):
        q0, q1, k0, k1 = cql[i], cql[i + 1], ckl[i], ckl[i + 1]
        qs, ks, vs = (t.detach()[a:b_].unsqueeze(0).clone().requires_grad_(True)
                      for t, a, b_ in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        o, lse_s = ops.attention(qs, ks, vs, causal=causal, return_lse=True)
        varlen_close(out[q0:q1], o[0], dtype, f"{what} seq {i} out")
        varlen_close(lse[:, q0:q1], lse_s[0], torch.float32, f"{what} seq {i} lse")
        (o * g[q0:q1].unsqueeze(0)).sum().backward()
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = qs.grad[0], ks.grad[0], vs.grad[0]
        if causal and q1 - q0 > k1 - k0:
            dead = (q1 - q0) - (k1 - k0)
            assert torch.equal(out[q0:q0 + dead], torch.zeros_like(out[q0:q0 + dead]))
            assert torch.all(lse[:, q0:q0 + dead] == float("-inf"))
            assert torch.equal(grads[0][q0:q0 + dead], torch.zeros_like(dq[q0:q0 + dead]))
    for n, a, e in zip("qkv", grads, (dq, dk, dv), strict=True):
        varlen_close(a, e, dtype, f"{what} d{n} vs dense")
    # a sequence with no keys: out 0, lse -inf, dq 0
    i = LENS_K.index(0)
    assert LENS_Q[i] > 0
    rows = slice(cql[i], cql[i + 1])
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.all(lse[:, rows] == float("-inf"))
    assert torch.equal(grads[0][rows], torch.zeros_like(grads[0][rows]))


def test_varlen_loose_max_seqlen(device):
    """max_seqlen_q/k are upper bounds: larger ones give the same result."""
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 2)
    lq, lk = [9, 30, 1], [12, 30, 64]
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    q = randn((sum(lq), 8, d), dtype, device)
    k, v = (randn((sum(lk), 1, d), dtype, device) for _ in range(2))
    tight = ops.attention_varlen(q, k, v, cq, ck, 30, 64, causal=True, return_lse=True)
    loose = ops.attention_varlen(q, k, v, cq, ck, 300, 200, causal=True, return_lse=True)
    for a, b_ in zip(tight, loose, strict=True):
        assert_same(b_, a, "varlen with loose max_seqlen")


def test_varlen_all_empty(device):
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 0)
    q = randn((0, 4, d), dtype, device).requires_grad_(True)
    k = randn((0, 2, d), dtype, device).requires_grad_(True)
    v = randn((0, 2, d), dtype, device).requires_grad_(True)
    cu = torch.zeros(3, dtype=torch.int32, device=device)
    out, lse = ops.attention_varlen(q, k, v, cu, cu, 0, 0, causal=True, return_lse=True)
    assert out.shape == (0, 4, d) and lse.shape == (4, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_noncontiguous_varlen_fused_qkv(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    h = 4
    d = head_dim_for(device, 0)
    lens = [3, 0, 50, 17]
    cu = cu_of(lens, device)
    qkv = randn((sum(lens), 3, h, d), dtype, device).requires_grad_(True)
    g = randn((sum(lens), h, d), dtype, device)

    def f(q_, k_, v_):
        return ops.attention_varlen(q_, k_, v_, cu, cu, 50, 50, causal=True)

    with Deterministic():
        q, k, v = qkv.unbind(1)
        out = f(q, k, v)
        (out * g).sum().backward()
        ref_out, grads = grads_of(
            f, [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)], g)
    assert_same(out, ref_out, "varlen out")
    assert_same(qkv.grad, torch.stack(grads, dim=1), "varlen d(qkv)")


def test_varlen_validate_false(device):
    """validate=False skips the host checks of the tables' values (no device sync): same
    result for a good table; the CPU kernels still refuse a bad one themselves."""
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 0)
    cq, ck = cu_of(LENS_Q, device), cu_of(LENS_K, device)
    q = randn((sum(LENS_Q), 4, d), dtype, device)
    k, v = (randn((sum(LENS_K), 2, d), dtype, device) for _ in range(2))
    args = (q, k, v, cq, ck, max(LENS_Q), max(LENS_K))
    checked = ops.attention_varlen(*args, causal=True, return_lse=True)
    unchecked = ops.attention_varlen(*args, causal=True, return_lse=True, validate=False)
    for a, b_ in zip(checked, unchecked, strict=True):
        assert torch.equal(a, b_)
    bad = cq.clone()
    bad[2] = bad[1] - 1  # decreasing
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.attention_varlen(q, k, v, bad, ck, max(LENS_Q), max(LENS_K))
    if device.type == "cpu":
        with pytest.raises(ValueError, match="non-decreasing"):
            ops.attention_varlen(q, k, v, bad, ck, max(LENS_Q), max(LENS_K), validate=False)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_no_key_sequence_every_run(causal, device):
    """Lengths q [128, 4], k [0, 8] (fp16, D 128): sequence 0 has no key, so the CUDA
    forward and deterministic dQ kernels have query blocks without a key tile, whose
    zero output is staged in shared memory right after the copy of Q (a race if not
    ordered). On every one of 1000 runs its out, dq must be exactly 0 and its lse -inf;
    the whole result and gradients to the 2x rule once."""
    dtype = torch.float16
    need_kernel_dtype(device, dtype)
    lq, lk, h, d = [128, 4], [0, 8], 8, 128
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    q = randn((sum(lq), h, d), dtype, device).requires_grad_(True)
    k, v = (randn((sum(lk), h, d), dtype, device).requires_grad_(True) for _ in range(2))
    g = randn(q.shape, dtype, device)
    dead = lq[0]
    what = f"varlen q {lq} k {lk} causal={causal}"
    reps = NO_KEY_REPS[device.type]

    def fwd():
        out, lse = ops.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                        return_lse=True, validate=False)
        return out[:dead], ~torch.isneginf(lse[:, :dead])

    assert_zero_every_run(fwd, reps, f"{what}: out/lse of the sequence with no key")
    with Deterministic():
        out, lse = ops.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                        return_lse=True)

        def bwd():
            (dq,) = torch.autograd.grad(out, (q,), g, retain_graph=True)
            return (dq[:dead],)

        assert_zero_every_run(bwd, reps, f"{what}: deterministic dq of the sequence with no key")
        grads = torch.autograd.grad(out, (q, k, v), g)

    res = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        ins = [t.double() for t in leaves] if upcast else leaves
        o, lg = ref.attention_varlen_fwd(*ins, cq.cpu(), ck.cpu(), max(lq), max(lk), causal,
                                         None, upcast=upcast)
        (o * g.to(o.dtype)).sum().backward()
        res.append((o, lg, [t.grad if t.grad is not None else torch.zeros_like(t)
                            for t in leaves]))
    (o64, l64, g64), (opt, lpt, gpt) = res
    check_2x(out, o64, opt, dtype, f"{what} out")
    check_2x(lse, l64, lpt, torch.float32, f"{what} lse")
    for n, a, e, p in zip("qkv", grads, g64, gpt, strict=True):
        check_2x(a, e, p, dtype, f"{what} d{n}")
