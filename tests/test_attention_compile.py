"""Fused attention under torch.library and torch.compile: opcheck of the four ops, compiled
functions and modules, and a few training steps against SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers import (
    KERNEL_DTYPES,
    randn,
)
from helpers.attention import (
    Deterministic,
    cu_of,
    head_dim_for,
    make_qkv,
)

from llmcore import ops


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
        with Deterministic():
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

