"""Reference attention (docs/attention.md): explicit scores, explicit masks, plain autograd.

Layout [batch, seq, heads, head_dim]; k/v may have fewer heads (GQA/MQA); with causal=True
query i sees keys j <= i + Sk - Sq (bottom-right aligned, as flash-attn). A row that sees
no key gives out = 0 and lse = -inf. Computed in float64 by default (the test oracle);
``upcast=False`` computes in the inputs' dtype (what "PyTorch at the same precision"
means in the tolerance rule of the tests).

Non-finite values follow the kernels' rule (docs/ops.md): a NaN in a score a row sees makes
that row's out and lse NaN; a product with a zero weight (a masked probability, a masked
dS) is left out, so a NaN or Inf that the mask hides never reaches an output. A plain
``p @ v`` would not do that (0 * NaN is NaN): :func:`contract_skip_zeros` does.
"""

from __future__ import annotations

import math

import torch


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """bool [sq, sk], True where query i may see key j (j <= i + sk - sq)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def contract_skip_zeros(eq: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(eq, a, b)`` (a sum of products a * b) in which a product whose a is
    exactly 0 is left out even where b is Inf or NaN. Differentiable in a and in the finite
    entries of b."""
    finite = torch.isfinite(b)
    if bool(finite.all()):
        return torch.einsum(eq, a, b)
    out = torch.einsum(eq, a, torch.where(finite, b, torch.zeros_like(b)))
    with torch.no_grad():  # what the non-finite entries of b add, where a is not 0
        def count(x, y):
            return torch.einsum(eq, x.to(out.dtype), y.to(out.dtype)) > 0

        nz, pos, neg = a != 0, a > 0, a < 0  # a NaN a is "not 0" (its product is NaN)
        pinf, ninf = b == float("inf"), b == float("-inf")
        nan = count(nz, torch.isnan(b))  # (a NaN a is NaN in `out` already)
        up = count(pos, pinf) | count(neg, ninf)
        down = count(pos, ninf) | count(neg, pinf)
        extra = torch.zeros_like(out)
        extra = extra.masked_fill(up, float("inf")) + torch.zeros_like(out).masked_fill(
            down, float("-inf"))  # both: inf + -inf = NaN
        extra = extra.masked_fill(nan, float("nan"))
    return out + extra


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
    # [B, H, Sq]; -inf for a row that sees no key, NaN for a row that sees a NaN score
    lse = _logsumexp(s)
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.where((lse == float("-inf")).unsqueeze(-1), torch.zeros_like(p), p)
    out = contract_skip_zeros("bhqk,bkhd->bqhd", p.to(vf.dtype), vf)
    return out.to(q.dtype), lse.float()


def _logsumexp(s: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis; NaN where a row holds a NaN or a +Inf (its softmax is
    undefined: exp(inf - inf))."""
    lse = torch.logsumexp(s, dim=-1)
    bad = torch.isnan(s).any(dim=-1) | (s == float("inf")).any(dim=-1)
    return lse.masked_fill(bad, float("nan"))


def attention_bwd(grad_out, q, k, v, out, lse, causal, softmax_scale, deterministic=False):
    """Gradients of :func:`attention_fwd` (float64): P = exp(S - lse), dP = dO V^T,
    dS = P (dP - rowsum(dO * O)) on the visible entries (0 elsewhere), dQ = scale dS K,
    dK = scale dS^T Q, dV = P^T dO, every product skipping zero weights as the forward."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qf, kf, vf, go = (t.detach().double() for t in (q, k, v, grad_out))
    if hkv != h:
        kf = kf.repeat_interleave(h // hkv, dim=2)
        vf = vf.repeat_interleave(h // hkv, dim=2)
    vis = causal_mask(sq, sk, q.device) if causal else torch.ones(sq, sk, dtype=torch.bool,
                                                                  device=q.device)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse64 = _logsumexp(s)
    seen = vis & (lse64 != float("-inf")).unsqueeze(-1)  # [B, H, Sq, Sk]
    p = torch.where(seen, torch.exp(s - lse64.unsqueeze(-1)), torch.zeros_like(s))
    o = contract_skip_zeros("bhqk,bkhd->bqhd", p, vf)
    dp = torch.einsum("bqhd,bkhd->bhqk", go, vf)
    delta = torch.einsum("bqhd,bqhd->bhq", go, o)
    ds = torch.where(seen, p * (dp - delta.unsqueeze(-1)), torch.zeros_like(p))
    gq = contract_skip_zeros("bhqk,bkhd->bqhd", ds, kf) * scale
    gk = contract_skip_zeros("bhqk,bqhd->bkhd", ds, qf) * scale
    gv = contract_skip_zeros("bhqk,bqhd->bkhd", p, go)
    if hkv != h:
        gk = gk.reshape(b, sk, hkv, h // hkv, d).sum(3)
        gv = gv.reshape(b, sk, hkv, h // hkv, d).sum(3)
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
    gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k), strict=True):
        if q1 == q0 or k1 == k0:
            continue
        g = attention_bwd(grad_out[q0:q1].unsqueeze(0), q[q0:q1].unsqueeze(0),
                          k[k0:k1].unsqueeze(0), v[k0:k1].unsqueeze(0), None, None, causal,
                          softmax_scale)
        gq[q0:q1], gk[k0:k1], gv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return gq, gk, gv
