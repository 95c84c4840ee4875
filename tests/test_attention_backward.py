"""Fused attention, backward (docs/attention.md): gradients of ``ops.attention`` against the
float64 reference, partial gradients, GQA sums, determinism and memory.

Tolerances: the 2x rule of tests/helpers/attention.py (docs/testing.md).
"""

from __future__ import annotations

import contextlib

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
    GRAD_CASES,
    NO_KEY_REPS,
    Deterministic,
    assert_zero_every_run,
    case_id,
    check_dense,
    head_dim_for,
    make_qkv,
    reference_dense,
)

from llmcore import ops


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_backward(case, dtype, device):
    need_kernel_dtype(device, dtype)
    b, sq, sk, h, hkv, causal, scale = case
    d = head_dim_for(device, GRAD_CASES.index(case) + 1)
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=True)
    check_dense(q, k, v, causal, scale, True, f"bwd {case_id(case)} d{d} {dtype}")


def test_inference_mode_and_partial_grads(device):
    """Under inference_mode the output is the same; with only v (or only q) requiring grad
    the others get none and the one that does matches the full backward."""
    dtype = KERNEL_DTYPES[device.type][-1]
    d = head_dim_for(device, 1)
    q, k, v = make_qkv(2, 27, 35, 4, 1, d, dtype, device)
    g = randn(q.shape, dtype, device)
    with Deterministic():
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

    with Deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        first, second = grads(), grads()
    for n, a, b_ in zip("qkv", first, second, strict=True):
        assert torch.equal(a, b_), f"d{n} differs between two deterministic runs"


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


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_no_key_tile_dq_every_run(deterministic, device):
    """dQ of causal q 1024 over k 64 (fp16, D 128): rows 0..959 see no key. The
    deterministic dQ kernel's first query blocks have no key tile and stage their zero dQ
    in shared memory right after the copy of Q (a race if not ordered): on every one of
    1000 backward passes those rows of dQ must be exactly 0; all gradients to the 2x rule
    once."""
    dtype = torch.float16
    need_kernel_dtype(device, dtype)
    sq, sk, dead = 1024, 64, 1024 - 64
    q, k, v = make_qkv(1, sq, sk, 8, 8, 128, dtype, device, requires_grad=True)
    g = randn(q.shape, dtype, device)
    det = Deterministic() if deterministic else contextlib.nullcontext()
    with det:
        out = ops.attention(q, k, v, causal=True)

        def run():
            (dq,) = torch.autograd.grad(out, (q,), g, retain_graph=True)
            return (dq[:, :dead],)

        what = f"q{sq} k{sk} causal deterministic={deterministic}"
        assert_zero_every_run(run, NO_KEY_REPS[device.type], f"{what}: dq rows with no key")
        grads = torch.autograd.grad(out, (q, k, v), g)
    (_, _, g64), (_, _, gpt) = reference_dense(q, k, v, True, None, g)
    for n, a, e, p in zip("qkv", grads, g64, gpt, strict=True):
        check_2x(a, e, p, dtype, f"{what} d{n}")
