"""Fused attention (docs/attention.md): FlashAttention-style forward and backward.

Tiles of K/V stream past a tile of Q with an online softmax; the seq_q x seq_k matrix is
never materialised; the per-row logsumexp is saved so the backward pass recomputes the
probabilities tile by tile. A drop-in for ``F.scaled_dot_product_attention`` in training
code (note the layout: [batch, seq, heads, head_dim], as flash-attn).

Kernels: CPU for float32 / bfloat16 / float16 and any head_dim; CUDA for float16 /
bfloat16 and the head dims of :mod:`llmcore.ops.capabilities` (32 to 256; the backward
stops at 128). Anything else runs the plain-PyTorch reference with a one-time warning. The
backward pass is deterministic when ``torch.use_deterministic_algorithms(True)`` is set.
"""

from __future__ import annotations

import math

import torch

from llmcore import _ext
from llmcore import reference as ref
from llmcore.ops._dispatch import kernel_or_reference, use_kernel


def _bwd_op(q: torch.Tensor, name: str):
    """The backward kernel, or the reference where the device has none for this shape."""
    return kernel_or_reference(name, q.device, q.dtype, q.shape[-1])


def _check_qkv(q, k, v, packed: bool) -> None:
    names = ("q", "k", "v")
    for n, t in zip(names, (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
    want = 3 if packed else 4
    layout = "[total_tokens, heads, head_dim]" if packed else "[batch, seq, heads, head_dim]"
    for n, t in zip(names, (q, k, v), strict=True):
        if t.dim() != want:
            raise ValueError(f"{n} must be {want}-D {layout}, got shape {list(t.shape)}")
        if not t.is_floating_point() or t.dtype == torch.float64:
            raise ValueError(f"{n} must be float32, bfloat16 or float16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q's heads ({h}) must be a multiple of k/v's heads ({hkv}) (GQA/MQA)")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be >= 1")


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              softmax_scale: float | None = None, return_lse: bool = False):
    """Scaled dot-product attention without the seq_q x seq_k matrix.

    Parameters
    ----------
    q : Tensor [batch, seq_q, heads, head_dim]
    k, v : Tensor [batch, seq_k, kv_heads, head_dim]
        ``heads % kv_heads == 0`` (GQA/MQA). Same dtype and device as q.
    causal : bool
        Query i attends to keys j <= i + seq_k - seq_q (mask aligned bottom-right).
    softmax_scale : float, optional
        Default 1 / sqrt(head_dim).
    return_lse : bool
        Also return the per-row logsumexp of the scaled scores.

    Returns
    -------
    out : Tensor [batch, seq_q, heads, head_dim], q's dtype. A row that sees no key is 0.
    lse : Tensor [batch, heads, seq_q] float32 (only with ``return_lse``; -inf for a row
        that sees no key; not differentiable).
    """
    _check_qkv(q, k, v, packed=False)
    scale = _scale(q, softmax_scale)
    if use_kernel("attention_fwd", q.device, q.dtype, q.shape[-1], name="attention"):
        out, lse = torch.ops.llmcore.attention_fwd(q, k, v, bool(causal), scale)
    else:
        out, lse = ref.attention_fwd(q.float(), k.float(), v.float(), bool(causal), scale,
                                     upcast=False)
        out, lse = out.to(q.dtype), lse.detach()  # lse is documented as not differentiable
    return (out, lse) if return_lse else out


def _check_cu(name: str, cu, device, n_rows: int) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
        got = f"{cu.dtype} {list(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be an int32 1-D tensor [batch + 1], got {got}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (0)")


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     validate: bool = True):
    """Attention over packed variable-length sequences.

    Parameters
    ----------
    q : Tensor [total_q, heads, head_dim]
    k, v : Tensor [total_k, kv_heads, head_dim]
    cu_seqlens_q, cu_seqlens_k : int32 Tensor [batch + 1]
        Sequence b is rows ``cu[b]:cu[b+1]``; ``cu[0] == 0``, non-decreasing, last entry
        the total.
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the per-sequence lengths.
    causal, softmax_scale, return_lse : as :func:`attention`.
    validate : bool
        Check the values of cu_seqlens_q / cu_seqlens_k against the packed tensors and
        the max_seqlen bounds on the host: a copy of both tables per call, two device
        syncs on a GPU. A training loop whose batches come from a trusted packer passes
        False. Unvalidated tables never make a kernel read or write out of bounds (the
        CUDA kernels clamp the entries to the packed tensors, the CPU kernels check them);
        a bad one gives wrong rows instead of an error.

    Returns
    -------
    out : Tensor [total_q, heads, head_dim]; lse : float32 [heads, total_q] (with return_lse).
    """
    _check_qkv(q, k, v, packed=True)
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    checks = (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
              ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k))
    for name, cu, total, mx in checks if validate else ():
        c = cu.cpu()
        lens = c[1:] - c[:-1]
        if c[0].item() != 0 or (lens < 0).any() or c[-1].item() != total:
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at {total} "
                             f"(the rows of the packed tensor), got {c.tolist()}")
        if lens.numel() and lens.max().item() > mx:
            raise ValueError(f"a sequence in {name} has {lens.max().item()} rows, more than "
                             f"the max_seqlen given ({mx})")
    scale = _scale(q, softmax_scale)
    if use_kernel("attention_varlen_fwd", q.device, q.dtype, q.shape[-1],
                  name="attention_varlen"):
        out, lse = torch.ops.llmcore.attention_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
            bool(causal), scale)
    else:
        out, lse = ref.attention_varlen_fwd(q.float(), k.float(), v.float(), cu_seqlens_q,
                                            cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            bool(causal), scale, upcast=False)
        out, lse = out.to(q.dtype), lse.detach()
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# torch.library: fake impls and autograd
# ---------------------------------------------------------------------------------------
if _ext.has_op("attention_fwd"):

    @torch.library.register_fake("llmcore::attention_fwd")
    def _(q, k, v, causal, softmax_scale):
        b, sq, h, _ = q.shape
        return torch.empty_like(q), q.new_empty((b, h, sq), dtype=torch.float32)

    @torch.library.register_fake("llmcore::attention_bwd")
    def _(grad_out, q, k, v, out, lse, causal, softmax_scale, deterministic):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("llmcore::attention_varlen_fwd")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
          softmax_scale):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("llmcore::attention_varlen_bwd")
    def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
          causal, softmax_scale, deterministic):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _fwd_setup(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)

    def _fwd_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        det = torch.are_deterministic_algorithms_enabled()
        gq, gk, gv = _bwd_op(q, "attention_bwd")(grad_out.contiguous(), q, k, v, out, lse,
                                                 ctx.causal, ctx.scale, det)
        return gq, gk, gv, None, None

    torch.library.register_autograd("llmcore::attention_fwd", _fwd_backward,
                                    setup_context=_fwd_setup)

    def _varlen_setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, mq, mk, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.mq, ctx.mk, ctx.causal, ctx.scale = mq, mk, causal, scale
        ctx.mark_non_differentiable(lse)

    def _varlen_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        det = torch.are_deterministic_algorithms_enabled()
        gq, gk, gv = _bwd_op(q, "attention_varlen_bwd")(
            grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.mq, ctx.mk, ctx.causal,
            ctx.scale, det)
        return gq, gk, gv, None, None, None, None, None, None

    torch.library.register_autograd("llmcore::attention_varlen_fwd", _varlen_backward,
                                    setup_context=_varlen_setup)
