"""Fused attention (DESIGN §2.3): ``ops.attention`` / ``ops.attention_varlen`` against the
float64 reference in llmcore.reference.attention.

Tolerance (STYLE "A reference beside every kernel", as flash-attention's
tests/test_flash_attn.py with attention_ref): the max error of llmcore against the float64
reference must be at most twice the max error of the same computation done by PyTorch in
the inputs' dtype (``reference.attention_fwd(..., upcast=False)``), plus a small floor
(1e-5 for float32, two ulps at magnitude 1 for the half types). Outputs that are exactly
determined (fully masked rows: out 0, lse -inf, zero grads) are checked exactly.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, UNIT_ROUNDOFF, check_2x, floor_2x, randn

from llmcore import _ext, ops
from llmcore import reference as ref
from llmcore.reference.attention import causal_mask

OPS = ("attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd")
# head_dims that take the kernel (CPU takes any; these are the ones the main cases rotate
# through), and the dtypes.
HEAD_DIMS = {"cpu": (16, 80, 128), "cuda": (64, 128)}
SWEEP_HEAD_DIMS = {"cpu": (1, 7, 32, 64, 96, 256), "cuda": (32, 64, 96, 128, 256)}
KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
                 "cuda": (torch.float16, torch.bfloat16)}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def need_kernel_dtype(device, dtype) -> None:
    if dtype not in KERNEL_DTYPES[device.type]:
        pytest.skip(f"{dtype} takes the reference path on {device.type}")


def head_dim_for(device, i: int) -> int:
    dims = HEAD_DIMS[device.type]
    return dims[i % len(dims)]


def make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=False):
    q = randn((b, sq, h, d), dtype, device)
    k = randn((b, sk, hkv, d), dtype, device)
    v = randn((b, sk, hkv, d), dtype, device)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def reference_dense(q, k, v, causal, scale, grad_out=None):
    """(out, lse, grads) of the float64 reference and of PyTorch at q's dtype."""
    res = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
        if upcast:
            leaves = [t.detach().double().requires_grad_(grad_out is not None) for t in leaves]
        out, lse = ref.attention_fwd(*leaves, causal, scale, upcast=upcast)
        grads = None
        if grad_out is not None:
            (out * grad_out.to(out.dtype)).sum().backward()
            grads = [t.grad for t in leaves]
        res.append((out.detach(), lse, grads))
    return res


def run_dense(q, k, v, causal, scale, grad_out=None):
    out, lse = ops.attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    grads = None
    if grad_out is not None:
        (out * grad_out).sum().backward()
        grads = [q.grad, k.grad, v.grad]
    return out, lse, grads


def check_dense(q, k, v, causal, scale, with_grad: bool, what: str):
    dtype = q.dtype
    g = randn(q.shape, dtype, q.device) if with_grad else None
    out, lse, grads = run_dense(q, k, v, causal, scale, g)
    assert out.dtype == dtype and out.device == q.device and out.shape == q.shape
    b, sq, h, _ = q.shape
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq), (lse.dtype, lse.shape)
    assert not lse.requires_grad, "lse must be non-differentiable"
    (o64, l64, g64), (opt, lpt, gpt) = reference_dense(q, k, v, causal, scale, g)
    check_2x(out, o64, opt, dtype, f"{what} out")
    check_2x(lse, l64, lpt, torch.float32, f"{what} lse")
    if with_grad:
        for n, a, e, p in zip("qkv", grads, g64, gpt, strict=True):
            assert a is not None and a.dtype == dtype and a.shape == e.shape, f"{what} d{n}"
            check_2x(a, e, p, dtype, f"{what} d{n}")
    return out, lse, grads


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_kernels_registered(op, device):
    assert _ext.available(), f"extension not loaded: {_ext.LOAD_ERROR}"
    assert _ext.has_op(op), f"the build lacks the schema llmcore::{op} (stale build?)"
    assert _ext.has_kernel(op, device), f"no {device.type} kernel registered for llmcore::{op}"


# ---------------------------------------------------------------------------------------
# dense forward / backward against the float64 reference
# ---------------------------------------------------------------------------------------
# (batch, seq_q, seq_k, heads, kv_heads, causal, softmax_scale)
FWD_CASES = [
    (1, 1, 1, 1, 1, False, None),
    (3, 7, 7, 4, 1, True, None),
    (1, 97, 97, 8, 1, True, 0.3),
    (3, 128, 128, 4, 4, False, None),
    (1, 1025, 1025, 2, 2, True, None),
    (3, 7, 97, 8, 1, True, None),      # seq_q < seq_k, causal
    (1, 97, 7, 4, 1, True, None),      # seq_q > seq_k, causal: rows 0..89 see no key
    (3, 128, 7, 2, 2, False, 1.7),     # seq_q > seq_k
    (1, 1, 1025, 8, 1, True, None),    # one query against a long cache
    (1, 1025, 97, 4, 4, False, None),
]
GRAD_CASES = [
    (1, 1, 1, 1, 1, False, None),
    (3, 7, 7, 4, 1, True, None),
    (1, 97, 97, 8, 1, True, None),
    (3, 128, 128, 2, 2, False, 0.3),
    (1, 7, 97, 4, 1, True, None),
    (1, 1025, 1025, 2, 1, True, None),
    (1, 97, 7, 4, 1, True, None),
    (3, 128, 97, 8, 8, False, None),
]


def _case_id(c):
    b, sq, sk, h, hkv, causal, scale = c
    return f"b{b}-q{sq}-k{sk}-h{h}x{hkv}" + ("-causal" if causal else "") + (
        f"-s{scale}" if scale is not None else "")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_forward(case, dtype, device):
    need_kernel_dtype(device, dtype)
    b, sq, sk, h, hkv, causal, scale = case
    d = head_dim_for(device, FWD_CASES.index(case))
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device)
    check_dense(q, k, v, causal, scale, False, f"fwd {_case_id(case)} d{d} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_backward(case, dtype, device):
    need_kernel_dtype(device, dtype)
    b, sq, sk, h, hkv, causal, scale = case
    d = head_dim_for(device, GRAD_CASES.index(case) + 1)
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=True)
    check_dense(q, k, v, causal, scale, True, f"bwd {_case_id(case)} d{d} {dtype}")


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


def test_inference_mode_and_partial_grads(device):
    """Under inference_mode the output is the same; with only v (or only q) requiring grad
    the others get none and the one that does matches the full backward."""
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 1)
    q, k, v = make_qkv(2, 27, 35, 4, 1, d, dtype, device)
    g = randn(q.shape, dtype, device)
    with _Deterministic():
        full = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = ops.attention(*full, causal=True)
        (out * g).sum().backward()
        with torch.inference_mode():
            assert torch.equal(ops.attention(q, k, v, causal=True), out.detach())
        for i in (0, 2):
            leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((q, k, v))]
            (ops.attention(*leaves, causal=True) * g).sum().backward()
            for j, t in enumerate(leaves):
                if j == i:
                    assert torch.equal(t.grad, full[j].grad), f"grad of input {j}"
                else:
                    assert t.grad is None


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


def test_gqa_grads_summed_over_group(device):
    """k/v grads under GQA are the sums over each group of the grads with k/v repeated."""
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 1)
    b, sq, sk, h, hkv = 2, 31, 47, 8, 2
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=True)
    g = randn(q.shape, dtype, device)
    (ops.attention(q, k, v, causal=True) * g).sum().backward()
    q2 = q.detach().clone().requires_grad_(True)
    k2 = k.detach().repeat_interleave(h // hkv, dim=2).requires_grad_(True)
    v2 = v.detach().repeat_interleave(h // hkv, dim=2).requires_grad_(True)
    (ops.attention(q2, k2, v2, causal=True) * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(q.grad, q2.grad, **tol)
    for n, a, rep in (("dk", k.grad, k2.grad), ("dv", v.grad, v2.grad)):
        summed = rep.float().view(b, sk, hkv, h // hkv, d).sum(3)
        torch.testing.assert_close(a.float(), summed, **tol, msg=lambda m, n=n: f"{n}: {m}")


class _Deterministic:
    """torch.use_deterministic_algorithms(True) for a block, restoring the previous mode."""

    def __enter__(self):
        self.prev = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev[0], warn_only=self.prev[1])
        return False


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_deterministic_backward(varlen, device):
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 0)
    b, s, h, hkv = 2, 257, 8, 2
    q, k, v = make_qkv(b, s, s, h, hkv, d, dtype, device)
    g = randn(q.shape, dtype, device)
    cu = torch.tensor([0, 100, 257, 514], dtype=torch.int32, device=device)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        if varlen:
            out = ops.attention_varlen(*(t.flatten(0, 1) for t in leaves), cu, cu, 257, 257,
                                       causal=True)
            out = out.view(q.shape)
        else:
            out = ops.attention(*leaves, causal=True)
        (out * g).sum().backward()
        return [t.grad for t in leaves]

    with _Deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        first, second = grads(), grads()
    for n, a, b_ in zip("qkv", first, second, strict=True):
        assert torch.equal(a, b_), f"d{n} differs between two deterministic runs"


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES["cuda"], ids=str)
def test_no_score_matrix_in_memory(dtype):
    """seq 32768: the [H, Sq, Sk] scores would take 16 GiB; forward and backward must stay
    within 32 times the size of q (1 GiB)."""
    dev = torch.device("cuda")
    b, s, h, d = 1, 32768, 8, 64
    q, k, v = make_qkv(b, s, s, h, h // 4, d, dtype, dev, requires_grad=True)
    g = randn(q.shape, dtype, dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ops.attention(q, k, v, causal=True)
    (out * g).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 32 * q.numel() * q.element_size(), f"peak extra memory {extra / 2**20:.0f} MiB"
    assert torch.isfinite(q.grad).all() and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------
LENS_Q = [5, 0, 97, 1, 33, 7, 0]
LENS_K = [5, 3, 97, 0, 40, 1, 0]


def cu_of(lens, device):
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def varlen_close(actual, expected, dtype, what):
    """Varlen against per-sequence dense calls of the same kernels: equal up to a rounding
    of the output dtype (the sums may be ordered differently)."""
    u = 1e-6 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype]
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: {list(a.shape)} != {list(e.shape)}"
    fin = torch.isfinite(e)
    assert torch.equal(a[~fin], e[~fin]) and torch.isfinite(a[fin]).all(), f"{what}: inf/nan"
    atol = floor_2x(dtype, e)
    bad = (a - e).abs()[fin] > 2 * u * e.abs()[fin] + atol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ; max |diff| " \
        f"{(a - e)[fin].abs().max().item():.3e}"


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
        _assert_same(b_, a, "varlen with loose max_seqlen")


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


# ---------------------------------------------------------------------------------------
# non-contiguous inputs
# ---------------------------------------------------------------------------------------
def _grads_of(fn, leaves, g):
    out = fn(*leaves)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _assert_same(a, b, what):
    assert torch.equal(a, b), f"{what}: differs from the contiguous inputs' result " \
        f"(max |diff| {(a.double() - b.double()).abs().max().item():.3e})"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_noncontiguous_fused_qkv(dtype, device):
    """q, k, v = qkv[B, S, 3, H, D].unbind(2): same result (and grads) as contiguous."""
    need_kernel_dtype(device, dtype)
    b, s, h = 2, 97, 4
    d = head_dim_for(device, 1)
    qkv = randn((b, s, 3, h, d), dtype, device).requires_grad_(True)
    g = randn((b, s, h, d), dtype, device)
    with _Deterministic():
        q, k, v = qkv.unbind(2)
        assert not q.is_contiguous()
        out = ops.attention(q, k, v, causal=True)
        (out * g).sum().backward()
        ref_out, (gq, gk, gv) = _grads_of(
            lambda q_, k_, v_: ops.attention(q_, k_, v_, causal=True),
            [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)], g)
    _assert_same(out, ref_out, "out")
    _assert_same(qkv.grad, torch.stack([gq, gk, gv], dim=2), "d(qkv)")


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
    with _Deterministic():
        out, lse = ops.attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                 causal=True, return_lse=True)
        (out * g).sum().backward()
        leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_(True)
                  for t in (qh, kh, vh)]
        ref_out, ref_lse = ops.attention(*leaves, causal=True, return_lse=True)
        (ref_out * g).sum().backward()
    _assert_same(out, ref_out, "out")
    _assert_same(lse, ref_lse, "lse")
    for n, a, leaf in zip("qkv", (qh, kh, vh), leaves, strict=True):
        _assert_same(a.grad, leaf.grad.transpose(1, 2), f"d{n}")


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

    with _Deterministic():
        q, k, v = qkv.unbind(1)
        out = f(q, k, v)
        (out * g).sum().backward()
        ref_out, grads = _grads_of(
            f, [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)], g)
    _assert_same(out, ref_out, "varlen out")
    _assert_same(qkv.grad, torch.stack(grads, dim=1), "varlen d(qkv)")


def test_noncontiguous_head_dim(device):
    """A strided last axis (every other element) still gives the contiguous result."""
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 1)
    big = [randn((2, 23, 4, 2 * d), dtype, device) for _ in range(3)]
    q, k, v = (t[..., ::2] for t in big)
    assert q.stride(-1) == 2
    out = ops.attention(q, k, v, causal=True)
    _assert_same(out, ops.attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                    causal=True), "out with strided head_dim")


# ---------------------------------------------------------------------------------------
# drop-in for F.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------
def _dense_samples(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 0)
    return [
        make_qkv(2, 19, 19, 4, 2, d, dtype, device, True) + (True, 1 / math.sqrt(d)),
        make_qkv(1, 23, 9, 2, 2, d, KERNEL_DTYPES[device.type][0], device, True) + (True, 0.4),
        make_qkv(1, 5, 31, 8, 1, d, dtype, device, True) + (False, 0.25),
    ]


def _varlen_samples(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 0)
    lq, lk = [7, 0, 20], [9, 4, 13]
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    q = randn((sum(lq), 4, d), dtype, device).requires_grad_(True)
    k = randn((sum(lk), 2, d), dtype, device).requires_grad_(True)
    v = randn((sum(lk), 2, d), dtype, device).requires_grad_(True)
    return [(q, k, v, cq, ck, max(lq), max(lk), causal, 0.3) for causal in (False, True)]


FWD_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
BWD_UTILS = ("test_schema", "test_faketensor")


def test_opcheck_attention(device):
    for args in _dense_samples(device):
        torch.library.opcheck(torch.ops.llmcore.attention_fwd.default, args,
                              test_utils=FWD_UTILS)
        q, k, v, causal, scale = (t.detach() if torch.is_tensor(t) else t for t in args)
        out, lse = torch.ops.llmcore.attention_fwd(q, k, v, causal, scale)
        g = randn(out.shape, out.dtype, device)
        for det in (False, True):
            torch.library.opcheck(torch.ops.llmcore.attention_bwd.default,
                                  (g, q, k, v, out, lse, causal, scale, det),
                                  test_utils=BWD_UTILS)


def test_opcheck_attention_varlen(device):
    for args in _varlen_samples(device):
        torch.library.opcheck(torch.ops.llmcore.attention_varlen_fwd.default, args,
                              test_utils=FWD_UTILS)
        q, k, v = (t.detach() for t in args[:3])
        out, lse = torch.ops.llmcore.attention_varlen_fwd(q, k, v, *args[3:])
        g = randn(out.shape, out.dtype, device)
        torch.library.opcheck(torch.ops.llmcore.attention_varlen_bwd.default,
                              (g, q, k, v, out, lse, *args[3:], True), test_utils=BWD_UTILS)


def test_torch_compile_function(device):
    torch._dynamo.reset()
    dtype = KERNEL_DTYPES[device.type][0]
    d = head_dim_for(device, 1)

    def f(q, k, v):
        out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
        return out, lse

    compiled = torch.compile(f, fullgraph=True)
    for sq, sk in ((29, 29), (13, 40)):  # a second shape
        q, k, v = make_qkv(2, sq, sk, 4, 2, d, dtype, device, requires_grad=True)
        g = randn(q.shape, dtype, device)
        with _Deterministic():
            e_out, e_lse = f(q, k, v)
            (e_out * g).sum().backward()
            e_grads = [t.grad for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
            c_out, c_lse = compiled(q, k, v)
            (c_out * g).sum().backward()
        torch.testing.assert_close(c_out, e_out, rtol=0, atol=0)
        torch.testing.assert_close(c_lse, e_lse, rtol=0, atol=0)
        for n, a, e in zip("qkv", (q.grad, k.grad, v.grad), e_grads, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, n=n: f"d{n}: {m}")


class TinyCausalSelfAttention(torch.nn.Module):
    """x [B, S, C] -> causal self-attention with GQA; ``use_sdpa`` selects the baseline."""

    def __init__(self, dim=32, heads=4, kv_heads=2, use_sdpa=False):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.proj = torch.nn.Linear(heads * self.d, dim)
        self.use_sdpa = use_sdpa

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.h + 2 * self.hkv, self.d)
        q, k, v = qkv.split([self.h, self.hkv, self.hkv], dim=2)  # [B, S, h, d], strided
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True,
                                               enable_gqa=True).transpose(1, 2)
        else:
            y = ops.attention(q, k, v, causal=True)
        return x + self.proj(y.reshape(b, s, -1))


def test_torch_compile_module(device):
    torch._dynamo.reset()
    dtype = KERNEL_DTYPES[device.type][0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    m = TinyCausalSelfAttention().to(device, dtype)
    x = randn((2, 24, 32), dtype, device)
    compiled = torch.compile(m, fullgraph=True)
    e = m(x)
    e.square().mean().backward()
    e_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    c = compiled(x)
    c.square().mean().backward()
    torch.testing.assert_close(c, e, **tol)
    for (n, p), eg in zip(m.named_parameters(), e_grads, strict=True):
        torch.testing.assert_close(p.grad, eg, **tol,
                                   msg=lambda msg, n=n: f"grad {n}: {msg}")


def test_training_matches_sdpa(device):
    """A few Adam steps of a causal self-attention layer: same losses as with SDPA."""
    x = randn((4, 32, 32), torch.float32, device)
    target = randn((4, 32, 32), torch.float32, device)
    init = TinyCausalSelfAttention().state_dict()
    losses = {}
    for use_sdpa in (False, True):
        m = TinyCausalSelfAttention(use_sdpa=use_sdpa)
        m.load_state_dict(init)
        m.to(device)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        run = []
        for _ in range(8):
            loss = F.mse_loss(m(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[use_sdpa] = run
    ours, sdpa = losses[False], losses[True]
    assert ours[-1] < ours[0], f"loss did not decrease: {ours}"
    for i, (a, b) in enumerate(zip(ours, sdpa, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {i}: loss {a} vs SDPA {b} ({ours} vs {sdpa})"


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------
def _good(device, dtype=torch.float32):
    d = 16
    return dict(q=randn((2, 5, 4, d), dtype, device), k=randn((2, 7, 2, d), dtype, device),
                v=randn((2, 7, 2, d), dtype, device))


BAD_DENSE = {
    "q 3-D": (lambda t: t.update(q=t["q"][0]), r"\bq\b.*4-D"),
    "k 5-D": (lambda t: t.update(k=t["k"][None]), r"\bk\b.*4-D"),
    "heads not a multiple": (lambda t: t.update(k=t["k"][:, :, :1].expand(2, 7, 3, 16),
                                                v=t["v"][:, :, :1].expand(2, 7, 3, 16)),
                             r"heads"),
    "head_dim mismatch": (lambda t: t.update(k=t["k"][..., :8], v=t["v"][..., :8]),
                          r"head_dim"),
    "k/v shape mismatch": (lambda t: t.update(v=t["v"][:, :6]), r"\bk\b.*\bv\b"),
    "dtype mismatch": (lambda t: t.update(k=t["k"].bfloat16()), r"dtype"),
    "float64": (lambda t: t.update(q=t["q"].double()), r"\bq\b.*float64"),
    "int": (lambda t: t.update(v=t["v"].int()), r"\bv\b.*int32"),
    "batch mismatch": (lambda t: t.update(k=t["k"][:1], v=t["v"][:1]), r"batch"),
    "not a tensor": (lambda t: t.update(q=t["q"].tolist()), r"\bq\b.*Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_DENSE))
def test_bad_inputs_dense(case, device):
    t = _good(device)
    mutate, pattern = BAD_DENSE[case]
    mutate(t)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_bad_softmax_scale(scale, device):
    t = _good(device)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.attention(t["q"], t["k"], t["v"], softmax_scale=scale)
    q, k, v = (x.flatten(0, 1) for x in (t["q"], t["k"][:, :5], t["v"][:, :5]))
    cu = torch.tensor([0, 5, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.attention_varlen(q, k, v, cu, cu, 5, 5, softmax_scale=scale)


def _varlen_args(device):
    q = randn((12, 4, 16), torch.float32, device)
    k = randn((15, 2, 16), torch.float32, device)
    v = randn((15, 2, 16), torch.float32, device)
    cq = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 6, 9, 15], dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7,
                max_seqlen_k=6)


def _cu(a, like):
    return torch.tensor(a, dtype=like.dtype, device=like.device)


BAD_VARLEN = {
    "q 4-D": (lambda a: a.update(q=a["q"][None]), r"\bq\b.*3-D"),
    "cu int64": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()),
                 r"cu_seqlens_q.*int32"),
    "cu 2-D": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][None]), r"cu_seqlens_k"),
    "cu not at 0": (lambda a: a.update(cu_seqlens_q=_cu([1, 5, 5, 12], a["cu_seqlens_q"])),
                    r"cu_seqlens_q.*start at 0"),
    "cu decreasing": (lambda a: a.update(cu_seqlens_k=_cu([0, 9, 6, 15], a["cu_seqlens_k"])),
                      r"cu_seqlens_k.*non-decreasing"),
    "cu wrong total q": (lambda a: a.update(cu_seqlens_q=_cu([0, 5, 5, 11],
                                                             a["cu_seqlens_q"])),
                         r"cu_seqlens_q.*12"),
    "cu wrong total k": (lambda a: a.update(cu_seqlens_k=_cu([0, 6, 9, 16],
                                                             a["cu_seqlens_k"])),
                         r"cu_seqlens_k.*15"),
    "more rows than max_seqlen_q": (lambda a: a.update(max_seqlen_q=6), r"max_seqlen"),
    "more rows than max_seqlen_k": (lambda a: a.update(max_seqlen_k=5), r"max_seqlen"),
    "cu length mismatch": (lambda a: a.update(cu_seqlens_k=_cu([0, 15], a["cu_seqlens_k"])),
                           r"cu_seqlens_q.*cu_seqlens_k.*length"),
    "heads not a multiple": (lambda a: a.update(k=a["k"][:, :1].expand(15, 3, 16),
                                                v=a["v"][:, :1].expand(15, 3, 16)),
                             r"heads"),
    "head_dim mismatch": (lambda a: a.update(v=a["v"][..., :8], k=a["k"][..., :8]),
                          r"head_dim"),
    "dtype mismatch": (lambda a: a.update(v=a["v"].half()), r"dtype"),
}


@pytest.mark.parametrize("case", list(BAD_VARLEN))
def test_bad_inputs_varlen(case, device):
    a = _varlen_args(device)
    mutate, pattern = BAD_VARLEN[case]
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.attention_varlen(**a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bad_inputs_device_mismatch():
    t = _good("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="device"):
        ops.attention(t["q"], t["k"].cpu(), t["v"])
    a = _varlen_args("cuda")
    a["cu_seqlens_k"] = a["cu_seqlens_k"].cpu()
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.attention_varlen(**a)
    a = _varlen_args("cuda")
    a["v"] = a["v"].cpu()
    with pytest.raises(ValueError, match="device"):
        ops.attention_varlen(**a)


# Direct calls of the bindings with bad shapes: each must raise ValueError / RuntimeError
# (never crash the process, never a missing-kernel NotImplementedError). Run in a child
# process so that a crash is reported as a failure naming the case instead of killing
# the test session.
_BINDING_SCRIPT = textwrap.dedent(r"""
    import sys, torch
    import llmcore._ext
    dev, dt = sys.argv[1], getattr(torch, sys.argv[2])
    L = torch.ops.llmcore
    r = lambda *s, dtype=dt: torch.randn(*s, device=dev).to(dtype)
    q, k, v = r(2, 5, 4, 64), r(2, 7, 2, 64), r(2, 7, 2, 64)
    out, lse, g = r(2, 5, 4, 64), torch.zeros(2, 4, 5, device=dev), r(2, 5, 4, 64)
    qp, kp, vp = r(12, 4, 64), r(15, 2, 64), r(15, 2, 64)
    i32 = dict(dtype=torch.int32, device=dev)
    cq, ck = torch.tensor([0, 5, 12], **i32), torch.tensor([0, 6, 15], **i32)
    outp, lsep, gp = r(12, 4, 64), torch.zeros(4, 12, device=dev), r(12, 4, 64)
    cases = {
        "fwd q 3-D": lambda: L.attention_fwd(q[0], k, v, False, 0.1),
        "fwd k 5-D": lambda: L.attention_fwd(q, k[None], v, False, 0.1),
        "fwd heads not a multiple": lambda: L.attention_fwd(q, r(2, 7, 3, 64), r(2, 7, 3, 64),
                                                            False, 0.1),
        "fwd head_dim mismatch": lambda: L.attention_fwd(q, k[..., :32], v[..., :32], True, .1),
        "fwd k/v seq mismatch": lambda: L.attention_fwd(q, k, v[:, :6], False, 0.1),
        "fwd k/v heads mismatch": lambda: L.attention_fwd(q, k, r(2, 7, 1, 64), False, 0.1),
        "fwd v head_dim mismatch": lambda: L.attention_fwd(q, k, r(2, 7, 2, 32), False, 0.1),
        "fwd batch mismatch": lambda: L.attention_fwd(q, k[:1], v[:1], False, 0.1),
        "fwd dtype mismatch": lambda: L.attention_fwd(q, k.float() if dt != torch.float32
                                                      else k.half(), v, False, 0.1),
        "fwd float64": lambda: L.attention_fwd(q.double(), k.double(), v.double(), False, .1),
        "fwd int": lambda: L.attention_fwd(q.int(), k.int(), v.int(), False, 0.1),
        "fwd zero kv heads": lambda: L.attention_fwd(q, k[:, :, :0], v[:, :, :0], False, 0.1),
        "bwd lse shape": lambda: L.attention_bwd(g, q, k, v, out, lse[:, :, :4], False, .1,
                                                 False),
        "bwd grad_out shape": lambda: L.attention_bwd(g[:, :4], q, k, v, out, lse, False, .1,
                                                      False),
        "bwd out shape": lambda: L.attention_bwd(g, q, k, v, out[..., :32], lse, False, .1,
                                                 True),
        "bwd lse dtype": lambda: L.attention_bwd(g, q, k, v, out, lse.to(dt) if dt !=
                                                 torch.float32 else lse.double(), False, .1,
                                                 False),
        "bwd k/v mismatch": lambda: L.attention_bwd(g, q, k, v[:, :6], out, lse, False, .1,
                                                    False),
        "varlen q 4-D": lambda: L.attention_varlen_fwd(qp[None], kp, vp, cq, ck, 7, 9, False,
                                                       .1),
        "varlen cu int64": lambda: L.attention_varlen_fwd(qp, kp, vp, cq.long(), ck, 7, 9,
                                                          False, .1),
        "varlen cu 2-D": lambda: L.attention_varlen_fwd(qp, kp, vp, cq[None], ck, 7, 9, False,
                                                        .1),
        "varlen cu length mismatch": lambda: L.attention_varlen_fwd(
            qp, kp, vp, cq, torch.tensor([0, 15], **i32), 7, 15, False, .1),
        "varlen heads not a multiple": lambda: L.attention_varlen_fwd(
            qp, r(15, 3, 64), r(15, 3, 64), cq, ck, 7, 9, False, .1),
        "varlen head_dim mismatch": lambda: L.attention_varlen_fwd(
            qp, kp[..., :32], vp[..., :32], cq, ck, 7, 9, False, .1),
        "varlen k/v mismatch": lambda: L.attention_varlen_fwd(qp, kp, vp[:14], cq, ck, 7, 9,
                                                              False, .1),
        "varlen dtype mismatch": lambda: L.attention_varlen_fwd(
            qp, kp.float() if dt != torch.float32 else kp.half(), vp, cq, ck, 7, 9, False,
            .1),
        "varlen bwd lse shape": lambda: L.attention_varlen_bwd(
            gp, qp, kp, vp, outp, lsep[:, :11], cq, ck, 7, 9, False, .1, False),
        "varlen bwd grad_out shape": lambda: L.attention_varlen_bwd(
            gp[:11], qp, kp, vp, outp, lsep, cq, ck, 7, 9, False, .1, False),
    }
    if dev == "cuda":  # what the CUDA kernels do not take must be refused, not crash
        cases["fwd head_dim 80"] = lambda: L.attention_fwd(r(2, 5, 4, 80), r(2, 7, 2, 80),
                                                           r(2, 7, 2, 80), False, 0.1)
        cases["fwd float32"] = lambda: L.attention_fwd(q.float(), k.float(), v.float(), False,
                                                       0.1)
        cases["fwd k on cpu"] = lambda: L.attention_fwd(q, k.cpu(), v, False, 0.1)
        cases["varlen cu on cpu"] = lambda: L.attention_varlen_fwd(qp, kp, vp, cq.cpu(), ck, 7,
                                                                   9, False, .1)
    bad = []
    for name, call in cases.items():
        print("case:", name, flush=True)
        try:
            call()
            if dev == "cuda":
                torch.cuda.synchronize()
            bad.append(f"{name}: no error")
        except NotImplementedError as e:
            bad.append(f"{name}: NotImplementedError (no kernel?) {str(e)[:120]}")
        except (ValueError, RuntimeError) as e:
            print("  ->", type(e).__name__, str(e).splitlines()[0][:160], flush=True)
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__} (want ValueError/RuntimeError): {e}")
    print("BAD:", bad, flush=True)
    sys.exit(1 if bad else 0)
""")


def test_bindings_reject_bad_shapes(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    p = subprocess.run([sys.executable, "-c", _BINDING_SCRIPT, device.type, str(dtype)[6:]],
                       capture_output=True, text=True, timeout=240)
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode >= 0, f"binding crashed (signal {-p.returncode}); last output:\n{tail}"
    assert p.returncode == 0, f"bindings accepted or mishandled bad inputs:\n{tail}"
