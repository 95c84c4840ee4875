"""Reference attention (docs/attention.md): explicit scores, explicit masks, plain autograd.

Layout [batch, seq, heads, head_dim]; k/v may have fewer heads (GQA/MQA); with causal=True
query i sees keys j <= i + Sk - Sq (bottom-right aligned, as flash-attn). A row that sees
no key gives out = 0 and lse = -inf. Computed in float64 by default (the test oracle);
``upcast=False`` computes in the inputs' dtype (what "PyTorch at the same precision"
means in the tolerance rule of the tests).
"""

from __future__ import annotations

import math

import torch


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """bool [sq, sk], True where query i may see key j (j <= i + sk - sq)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                  softmax_scale: float | None = None, upcast: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32). Differentiable."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    dt = torch.float64 if upcast else q.dtype
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if hkv != h:
        kf = kf.repeat_interleave(h // hkv, dim=2)
        vf = vf.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if causal:
        s = s.masked_fill(~causal_mask(sq, sk, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]; -inf for empty rows
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.where(torch.isfinite(lse).unsqueeze(-1), p, torch.zeros_like(p))
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(vf.dtype), vf)
    return out.to(q.dtype), lse.float()


def attention_bwd(grad_out, q, k, v, out, lse, causal, softmax_scale, deterministic=False):
    """Gradients of :func:`attention_fwd` (recomputed with autograd, float64)."""
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o, _ = attention_fwd(qd, kd, vd, causal, softmax_scale)
    gq, gk, gv = torch.autograd.grad(o, (qd, kd, vd), grad_out.double())
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:], strict=True))


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal=False, softmax_scale=None, upcast=True):
    """Packed batches: q [Tq, H, D], k/v [Tk, Hkv, D] -> (out [Tq, H, D], lse [H, Tq])."""
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k), strict=True):
        o, l = attention_fwd(q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0),
                             v[k0:k1].unsqueeze(0), causal, softmax_scale, upcast)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return out, lse


def attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal, softmax_scale, deterministic=False):
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o, _ = attention_varlen_fwd(qd, kd, vd, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, causal, softmax_scale)
    gq, gk, gv = torch.autograd.grad(o, (qd, kd, vd), grad_out.double(), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.to(t.dtype)
                 for g, t in ((gq, q), (gk, k), (gv, v)))
