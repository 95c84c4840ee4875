"""A Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) on llmcore ops.

``backend="llmcore"`` runs attention through :func:`llmcore.ops.attention` (prefill) and
:class:`~llmcore.models.KVCache` / ``decode_attention`` (cached steps), and BFP linears
when quantised; ``backend="torch"`` runs the same weights through plain PyTorch (SDPA and
F.linear, a dense cache written by indexing) so any path can be A/B-compared in one
process. Parameter names follow Hugging Face's Llama (without the ``model.`` prefix), so
checkpoints load by name (:mod:`llmcore.models.hf`).

A cached forward is host checks (``cache.prepare``), then :meth:`Transformer.step` (device
work only: no host sync, no branch on the cache's lengths; the caller says whether it is a
prefill), then ``cache.commit()``. ``step`` compiles with ``torch.compile(fullgraph=True)``;
assigning the compiled function to ``model.step`` makes ``model(ids, cache=cache)`` use it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmcore import ops
from llmcore.formats import get_format
from llmcore.models import hf
from llmcore.models.config import TransformerConfig, check_model_dtype
from llmcore.models.decoder_plan import DecoderPlan
from llmcore.models.kv_cache import KVCache
from llmcore.nn import BFPEmbedding, BFPLinear, replace_linear
from llmcore.nn.bfp_linear import _excluded, bfp_linears_shared_input
from llmcore.ops import fused
from llmcore.ops._dispatch import kernel_supported
from llmcore.ops.bfp import BFPTensor, tile_layout, tiles_fast
from llmcore.ops.dense import gemv_applies
from llmcore.ops.memory import (
    check_hugepages,
    module_tensors,
    pack_tensors,
    packed_bytes,
    wants_hugepages,
)
from llmcore.ops.memory import pack_hugepages as _pack_hugepages

BACKENDS = ("llmcore", "torch")
_FUSED_OPS = ("rms_norm", "add_rms_norm", "rope_", "silu_mul")  # the fused inference path


class Packed(NamedTuple):
    """Several sequences packed into one row: sequence i is tokens
    ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32 [n + 1]); ``segment_ids`` [total] the sequence
    of each token; ``max_seqlen`` the longest."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    segment_ids: torch.Tensor


def pack_info(cu_seqlens: torch.Tensor, total: int, max_seq_len: int | None = None,
              device=None) -> tuple[Packed, torch.Tensor]:
    """Check a ``cu_seqlens`` table against ``total`` packed tokens and return the
    :class:`Packed` description and the positions [total] (restarting at 0 in each
    sequence). Raises ValueError naming ``cu_seqlens`` for a malformed table."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [n_sequences + 1], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{list(getattr(cu_seqlens, 'shape', []))}")
    c = cu_seqlens.detach().to("cpu", torch.int64)
    lens = c[1:] - c[:-1]
    if c[0].item() != 0 or c[-1].item() != total or (lens <= 0).any():
        raise ValueError(f"cu_seqlens must start at 0, increase strictly (no empty sequence) "
                         f"and end at the {total} packed tokens, got {c.tolist()[:16]}")
    longest = int(lens.max())
    if max_seq_len is not None and longest > max_seq_len:
        raise ValueError(f"a packed sequence of {longest} tokens is longer than max_seq_len "
                         f"{max_seq_len}")
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    positions = torch.arange(total) - c[seg]
    cu = c.to(device=device, dtype=torch.int32)
    return Packed(cu, longest, seg.to(device)), positions.to(device)


def rope_inv_freq(cfg: TransformerConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3 or linear scaling if configured
    (the same arithmetic as Hugging Face's rope initialisation)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = (
            layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        kw = {"device": device, "dtype": dtype}
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=b, **kw)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=b, **kw)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=b, **kw)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False, **kw)

    def forward(self, x, cos, sin, cache: KVCache | None, positions, backend: str,
                prefill: bool, packed: Packed | None = None):
        b, t, _ = x.shape  # x: [B, T, dim]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        # [B, T, 1, hd], in the projections' dtype: under autocast they are bf16 while the
        # residual stream (and so cos/sin) stays fp32, and q, k, v must share a dtype
        cos, sin = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if backend == "llmcore":
                cache.append(self.layer, k, v)
            else:
                self._torch_write(k, v, cache, positions)
        if packed is not None:  # one row of packed sequences: each sees only itself
            o = self._packed(q, k, v, backend, packed)
        elif cache is None or prefill:  # an empty cache: the new tokens see only each other
            o = self._dense(q, k, v, backend)
        elif backend == "llmcore":
            o = cache.attend(self.layer, q)
        else:
            o = self._torch_cached(q, cache, positions)
        return self.o_proj(o.reshape(b, t, -1))

    def forward_fused(self, h, cos, sin, cache: KVCache | None, prefill: bool,
                      packed: Packed | None = None):
        """:meth:`forward` on the llmcore backend for inference (no gradient recorded): q, k
        and v from one call when they are BFP linears sharing the quantised input, RoPE of
        q and k in place in one op. ``h`` [B, T, dim] is the normed input, cos/sin
        [B, T, hd] in h's dtype."""
        b, t, _ = h.shape
        qkv = bfp_linears_shared_input(h, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = qkv if qkv is not None else (dense(self.q_proj, h), dense(self.k_proj, h),
                                               dense(self.v_proj, h))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        if q.dtype == cos.dtype == k.dtype:  # (the kernel is there: _fused_inference)
            torch.ops.llmcore.rope_(q, k, cos, sin)
        else:  # projections in another dtype (autocast): as forward
            c, s = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
            q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        if cache is not None and packed is None and not prefill:
            o = cache.append_attend(self.layer, q, k, v)
        else:
            if cache is not None:
                cache.append(self.layer, k, v)
            o = (self._packed(q, k, v, "llmcore", packed) if packed is not None
                 else self._dense(q, k, v, "llmcore"))
        return dense(self.o_proj, o.reshape(b, t, -1))

    def _dense(self, q, k, v, backend):
        if backend == "llmcore":
            return ops.attention(q, k, v, causal=True)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return o.transpose(1, 2)

    def _packed(self, q, k, v, backend, packed: Packed):
        """Causal attention inside each packed sequence (q, k, v [1, total, heads, hd]):
        ``attention_varlen`` on the llmcore backend, SDPA with a block-diagonal causal mask
        on the torch backend."""
        if backend == "llmcore":
            cu, mx = packed.cu_seqlens, packed.max_seqlen
            return ops.attention_varlen(q[0], k[0], v[0], cu, cu, mx, mx, causal=True,
                                        validate=False).unsqueeze(0)
        seg = packed.segment_ids
        idx = torch.arange(seg.numel(), device=seg.device)
        mask = (seg.unsqueeze(1) == seg.unsqueeze(0)) & (idx.unsqueeze(1) >= idx.unsqueeze(0))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return o.transpose(1, 2)

    def _torch_write(self, k, v, cache: KVCache, positions):
        """Plain PyTorch writes into a float, contiguous KVCache (index assignment)."""
        if cache.storage == "mxint8" or cache.page_size is not None:
            raise ValueError("backend='torch' needs a float (not mxint8), non-paged KVCache")
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
        kc, vc = cache.layer_kv(self.layer)  # [B, S, Hkv, hd]
        kc[rows, positions] = k.to(kc.dtype)
        vc[rows, positions] = v.to(vc.dtype)

    def _torch_cached(self, q, cache: KVCache, positions):
        """Masked SDPA over the whole cache buffer: key j is seen by the query at position
        p when j <= p (the mask comes from device positions; no host sync)."""
        kc, vc = cache.layer_kv(self.layer)  # [B, S, Hkv, hd]
        keys = torch.arange(kc.shape[1], device=q.device)
        mask = keys.view(1, 1, -1) <= positions.unsqueeze(-1)  # [B, T, S]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2).to(q.dtype),
                                           vc.transpose(1, 2).to(q.dtype),
                                           attn_mask=mask.unsqueeze(1),
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return o.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, **kw)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, **kw)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, h):
        """:meth:`forward` for inference: gate and up from one call when they are BFP
        linears sharing the quantised input, silu(gate) * up in one op."""
        gu = bfp_linears_shared_input(h, (self.gate_proj, self.up_proj))
        g, u = gu if gu is not None else (dense(self.gate_proj, h), dense(self.up_proj, h))
        y = (torch.ops.llmcore.silu_mul(g, u) if g.dtype == u.dtype == h.dtype
             else fused.silu_mul(g, u))
        return dense(self.down_proj, y)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.self_attn = Attention(cfg, layer, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x, cos, sin, cache, positions, backend, prefill, packed=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, backend,
                               prefill, packed)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, h, next_norm: RMSNorm, cos, sin, cache, prefill, packed=None):
        """:meth:`forward` for inference on the llmcore backend, with each residual add
        fused into the norm after it: ``h`` is ``input_layernorm(x)`` (computed by the block
        before); returns the new residual stream x and ``next_norm`` of it (the next
        block's input norm, or the final norm)."""
        a = self.self_attn.forward_fused(h, cos, sin, cache, prefill, packed)
        x, h = _add_rms_norm(x, a, self.post_attention_layernorm)
        return _add_rms_norm(x, self.mlp.forward_fused(h), next_norm)


def dense(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in the inference paths (fused blocks, the cached step's head): a plain
    ``nn.Linear`` whose product the dense GEMV kernel takes (CPU, at most 16 rows, x's dtype:
    ``ops.dense.gemv_applies``) runs ``linear_gemv``, the weight streamed once, as
    ``llmcore::decoder_layers`` does for the same projection (so the two stay bit for bit
    equal); anything else, or a recorded gradient, runs the module."""
    if type(linear) is nn.Linear and not torch.is_grad_enabled():
        w, b = linear.weight, linear.bias
        if gemv_applies(x, w, b):
            return torch.ops.llmcore.linear_gemv(x, w, b)
    return linear(x)


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm):
    """(x + delta, norm(x + delta)) in one kernel (x and the norm's weight share a dtype and
    have a kernel: checked by Transformer._fused_inference), or the chain for a delta of
    another dtype (autocast)."""
    if delta.dtype == x.dtype:
        return torch.ops.llmcore.add_rms_norm(x, delta, norm.weight, norm.eps)
    return fused.add_rms_norm(x, delta, norm.weight, norm.eps)


def _check_keep(keep, input_ids: torch.Tensor):
    """``logits_to_keep`` of :meth:`Transformer.forward`, checked against input_ids [B, T]."""
    if isinstance(keep, torch.Tensor):
        b, t = input_ids.shape[0], input_ids.shape[-1]
        if keep.dim() != 2 or keep.shape[0] != b or keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"logits_to_keep must be an int or an integer tensor [batch, n] "
                             f"of positions, got {keep.dtype} {list(keep.shape)} for "
                             f"input_ids {list(input_ids.shape)}")
        if keep.numel() and not torch.compiler.is_compiling() \
                and bool(((keep < 0) | (keep >= t)).any()):
            raise ValueError(f"logits_to_keep holds positions outside [0, {t})")
        return keep.to(device=input_ids.device, dtype=torch.int64)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a tensor of positions, got "
                         f"{keep!r}")
    return keep


def _kept(h: torch.Tensor, keep) -> torch.Tensor:
    """The rows of h [B, T, dim] whose logits are kept (see Transformer.forward)."""
    if isinstance(keep, torch.Tensor):
        return h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    return h[:, -keep:] if keep else h


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook (global or of one of ``modules``) would see their calls."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules))


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """input_ids must be an integer tensor [batch, seq] of ids in the vocabulary."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                         f"{input_ids.dtype} {list(input_ids.shape)}")
    check_token_ids(input_ids, vocab_size)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError naming the first id outside [0, vocab_size) (before anything
    touches a cache: an embedding lookup would raise IndexError on the CPU and a device
    assert on CUDA). One host sync; skipped under torch.compile."""
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    if input_ids.device.type == "cpu" and input_ids.numel() <= 64:  # a decode step's ids:
        ids = input_ids.reshape(-1).tolist()  # compared in Python, not in four torch ops
        if 0 <= min(ids) and max(ids) < vocab_size:
            return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        pos = bad.nonzero()[0].tolist()
        raise ValueError(f"input_ids{pos} = {input_ids[tuple(pos)].item()} is outside the "
                         f"vocabulary [0, {vocab_size})")


def _act_for(weight_format, act_format):
    """The activation format of :meth:`Transformer.quantize` for one weight format:
    ``"auto"`` is MXINT8 for weights in blocks of 32 (the int8-activation kernels), else
    weight-only."""
    if act_format != "auto":
        return act_format
    return "mxint8" if get_format(weight_format).block_size == 32 else None


def _wants_tiles(tiles) -> bool:
    """Whether ``tiles`` (True, False or "auto": where the CPU kernels read tiles directly)
    asks for the GEMV tile layout; any other value raises ValueError."""
    if tiles not in (True, False, "auto"):
        raise ValueError(f"tiles must be True, False or 'auto', got {tiles!r}")
    return tiles is True or (tiles == "auto" and tiles_fast())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class Transformer(nn.Module):
    """``model(input_ids)`` -> logits [B, T, vocab]; ``model(input_ids, cache=cache)``
    appends the new tokens to ``cache`` and returns their logits."""

    def __init__(self, config: TransformerConfig, backend: str = "llmcore", device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_model_dtype(dtype)
        self.config, self.backend = config, backend
        # False: inference runs the module chain too (forward hooks on the blocks, norms
        # and attention run only there; the fused path calls the projections directly)
        self.fused_inference = True
        self._plan: DecoderPlan | None = None  # decoder_layers' arguments (see _decoder_layers)
        self._rope_table: tuple | None = None  # (inv_freq, cos, sin): see rope()
        kw = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, **kw)
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device, dtype)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, **kw)
        self.register_buffer("inv_freq", None, persistent=False)
        self._tie_and_rope()

    def _tie_and_rope(self) -> None:
        """What ties the weights and fills the non-parameter state: the head tied to the
        embedding (if configured) and the RoPE frequencies."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)

    @classmethod
    def empty(cls, config: TransformerConfig, backend: str = "llmcore", device=None,
              dtype: torch.dtype | None = None) -> Transformer:
        """A model with zero weights, allocated once on ``device`` without a random
        initialisation (to be filled from a checkpoint)."""
        with torch.device("meta"):
            model = cls(config, backend=backend, dtype=dtype)
        model = model.to_empty(device=device if device is not None else "cpu")
        model._tie_and_rope()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model

    @property
    def device(self) -> torch.device:
        e = self.embed_tokens
        return e.device if isinstance(e, BFPEmbedding) else e.weight.device

    @property
    def dtype(self) -> torch.dtype:
        e = self.embed_tokens
        return e.dtype if isinstance(e, BFPEmbedding) else e.weight.dtype

    def head_tied(self) -> bool:
        """Whether the output head and the input embedding share one matrix (a full-precision
        tied weight, or one BFP matrix after :meth:`quantize`)."""
        h, e = self.lm_head, self.embed_tokens
        if isinstance(h, BFPLinear) and isinstance(e, BFPEmbedding):
            return h.weight_mantissa is e.weight_mantissa
        return isinstance(e, nn.Embedding) and getattr(h, "weight", None) is e.weight

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, storage: str = "native",
                  page_size: int | None = None, hugepages: bool | str = "auto") -> KVCache:
        """A KVCache shaped for this model. ``hugepages``: keys and values in 2 MB pages
        (:class:`KVCache`); "auto" does on the CPU where the system gives them
        (:func:`llmcore.ops.memory.hugepages_enabled`)."""
        c = self.config
        return KVCache(c.n_layers, batch_size, max_seq_len or c.max_seq_len, c.n_kv_heads,
                       c.head_dim, dtype=self.dtype, device=self.device, storage=storage,
                       page_size=page_size, hugepages=hugepages)

    def rope(self, positions: torch.Tensor, dtype, end: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., head_dim] in ``dtype`` of integer ``positions``. ``end`` (a host
        int above every position) lets a CPU forward read them from a table of positions
        [0, n) computed once (the same float32 arithmetic, so the same values: a decode
        step otherwise spends ~0.1 ms of torch ops here); the table is rebuilt when
        ``inv_freq`` is replaced (moving the model, loading) and grows when ``end`` passes
        it. Under torch.compile, or
        without ``end``, they are computed."""
        if (end is None or positions.device.type != "cpu" or torch.compiler.is_compiling()):
            return self._rope_values(positions, dtype)
        cos_t, sin_t = self._rope_tables(end, positions.device)
        idx = positions.reshape(-1)
        shape = (*positions.shape, cos_t.shape[-1])
        return (cos_t.index_select(0, idx).view(shape).to(dtype),
                sin_t.index_select(0, idx).view(shape).to(dtype))

    def _rope_tables(self, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos, sin [n, head_dim] of the positions [0, n), n >= ``end``, on
        ``device`` (see :meth:`rope`)."""
        inv, table = self.inv_freq, self._rope_table
        same = table is not None and table[0] is inv
        if not same or table[1].shape[0] < end:
            # multiples of 32 positions: every element takes torch's vectorised cos / sin
            n = -(-max(end, 2 * table[1].shape[0] if same else 0, 32) // 32) * 32
            with torch.no_grad():
                cos, sin = self._rope_values(torch.arange(n, device=device), torch.float32)
            table = self._rope_table = (inv, cos, sin)
        return table[1], table[2]

    def _rope_values(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                prefill: bool = False, *, cu_seqlens: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """Logits [B, T, vocab] of ``input_ids`` [B, T].

        ``cu_seqlens`` (int32 [n + 1], no cache) packs several sequences into one row:
        ``input_ids`` is [1, total], sequence i its tokens ``cu_seqlens[i]:cu_seqlens[i+1]``;
        each attends only within itself (``attention_varlen``) and its positions restart
        at 0, so its logits are those it gets alone, and no compute goes to padding.

        With ``cache``, the tokens are appended to it. ``prefill=True`` says the cache is
        empty (checked): the tokens attend only to each other (flash attention, any
        length). ``prefill=False`` attends over the cache (``decode_attention`` on the
        llmcore backend, fastest for a few tokens: decoding and draft verification).
        A failed step leaves the cache as it was.

        ``logits_to_keep`` computes the output head only where logits are wanted (a prompt
        needs just its last position's: the head is a quarter of a 1B model's FLOPs): 0
        (the default) keeps every position, an int n > 0 the last n ([B, n, vocab]), and an
        integer tensor [B, n] of positions those of each row (as ``gather`` along T).
        """
        keep = _check_keep(logits_to_keep, input_ids)
        if cache is None:  # the checks and positions are hidden_states'
            return self.lm_head(_kept(self.hidden_states(input_ids, cu_seqlens=cu_seqlens),
                                      keep))
        _check_ids(input_ids, self.config.vocab_size)
        b, t = input_ids.shape
        if cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} sequences, input_ids {b}")
        cache.prepare(t, prefill=prefill, want_positions=False)  # step() computes them
        try:
            logits = self.step(input_ids, cache, prefill, keep)
        except BaseException:
            cache.cancel()
            raise
        cache.commit()
        return logits

    def step(self, input_ids: torch.Tensor, cache: KVCache, prefill: bool = False,
             logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """The device work of a cached forward, between ``cache.prepare(T)`` and
        ``cache.commit()``: positions from ``cache.seqlens``, k/v written into the cache,
        attention, logits [B, T, vocab] (or those of ``logits_to_keep``, checked by
        :meth:`forward`). No checks and no host sync: this is the part to compile
        (``torch.compile(model.step, fullgraph=True)``)."""
        return self._logits(input_ids, cache.positions(input_ids.shape[1]), cache, prefill,
                            logits_to_keep)

    @torch.inference_mode()
    def decode_greedy(self, tokens: torch.Tensor, cache: KVCache, steps: int,
                      eos_token_id: int | Sequence[int] | None = None, fill: int = 0,
                      done: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding over a filled ``cache``: up to ``steps`` new tokens per sequence.

        ``tokens`` [B] (or [B, 1]) holds each sequence's last token, not yet in the cache
        (the pick from a prefill's logits); [B, P] holds each sequence's last P tokens not
        yet in the cache, all appended by the first step (one forward of P positions, the
        pick after the last: a drafter catching up on an accepted token and a bonus one).
        Each step appends the current tokens to the cache and picks the next ones: the
        argmax of their logits (the first index on ties). A sequence finishes at a token
        of ``eos_token_id``; from then on its picks are replaced by ``fill`` (``done``,
        bool [B], marks sequences finished before the call), and decoding stops after the
        first step at which every sequence has finished.

        Returns LongTensor [B, n], n <= steps: the new tokens. The cache then holds
        ``tokens`` and every new token but the last (the next call's ``tokens``): what
        ``model(tokens, cache=cache)``, then n - 1 calls of ``model(tok, cache=cache)``, and
        an argmax of each last position leave, with the same tokens bit for bit. On the
        CPU with the llmcore backend the whole loop is one op, ``llmcore::greedy_decode`` (no Python between steps: a small model's decode step
        spends about a tenth of its time there otherwise); elsewhere it makes those calls.
        """
        if tokens.dim() == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
            raise ValueError(f"tokens must be [batch] or [batch, prefix >= 1], got shape "
                             f"{list(tokens.shape)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
        for i in [*eos, fill]:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"eos_token_id and fill must be non-negative ints, got "
                                 f"{eos_token_id!r} and {fill!r}")
        b = tokens.shape[0]
        if cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} sequences, tokens {b}")
        _check_ids(tokens.view(b, -1), self.config.vocab_size)
        device = self.device
        tokens = tokens.to(device=device, dtype=torch.int64)
        if done is None:
            done = torch.zeros(b, dtype=torch.bool, device=device)
        elif (not isinstance(done, torch.Tensor) or done.dtype != torch.bool
              or tuple(done.shape) != (b,)):
            raise ValueError(f"done must be a bool tensor [{b}], got "
                             f"{getattr(done, 'dtype', type(done))} "
                             f"{list(getattr(done, 'shape', []))}")
        if steps == 0:
            return tokens.new_empty((b, 0))
        plan = self._greedy_plan(tokens, cache)
        if plan is None:
            return self._decode_greedy_steps(tokens, cache, steps, eos, fill, done.to(device))
        extra = tokens.shape[1] - 1 if tokens.dim() == 2 else 0  # prefix tokens before the last
        cache.prepare(steps + extra, want_positions=False)
        try:
            cos, sin = self._rope_tables(cache.end, tokens.device)
            out = torch.ops.llmcore.greedy_decode(
                tokens, steps, plan.weights, *plan.embedding, plan.head, plan.head_spec, cos,
                sin, cache.k_values, cache.v_values, cache.k_exponents, cache.v_exponents,
                cache._seq, cache._table, 1.0 / math.sqrt(cache.head_dim), eos, fill,
                done.to(device))
        except BaseException:
            cache.cancel()
            raise
        cache.commit(out.shape[1] + extra)
        return out

    def _greedy_plan(self, tokens: torch.Tensor, cache: KVCache) -> DecoderPlan | None:
        """The plan whose ``greedy_decode`` takes :meth:`decode_greedy` (:meth:`_cpu_plan`'s
        conditions, a head and an embedding the op takes, no forward hooks on the model,
        its embedding or its head), else None."""
        if _hooked(self, self.embed_tokens, self.lm_head):
            return None
        plan = self._cpu_plan(tokens.device, self.dtype, cache)
        return plan if plan is not None and plan.head is not None else None

    def _cpu_plan(self, device: torch.device, dtype: torch.dtype, cache: KVCache
                  ) -> DecoderPlan | None:
        """The covering :class:`DecoderPlan` for a cached CPU inference step with
        activations of ``dtype`` on ``device`` (built or rebuilt as needed), or None: the
        fused llmcore path off, no gradient recording, a CPU cache of that dtype with
        kernels, not under autocast or torch.compile."""
        if (not self.fused_inference or self.backend != "llmcore" or torch.is_grad_enabled()
                or device.type != "cpu" or torch.compiler.is_compiling()
                or torch.is_autocast_enabled("cpu") or cache.dtype != dtype
                or cache.device.type != "cpu" or not cache._cpu_kernels(dtype)):
            return None
        plan = self._plan
        if plan is None or not plan.valid(dtype):
            plan = self._plan = DecoderPlan.build(self, dtype, Block, RMSNorm)
        return plan if plan.covered else None

    def _decode_greedy_steps(self, tok, cache, steps, eos, fill, done) -> torch.Tensor:
        """:meth:`decode_greedy` one forward call per step (the first over the prefix)."""
        eos_t = torch.tensor(eos, dtype=torch.int64, device=tok.device) if eos else None
        out = []
        ids = tok.view(tok.shape[0], -1)
        for _ in range(steps):
            tok = fused.argmax(self(ids, cache=cache)[:, -1])
            tok = torch.where(done, torch.full_like(tok, fill), tok)
            ids = tok.unsqueeze(1)
            out.append(tok)
            if eos_t is not None:
                done = done | torch.isin(tok, eos_t)
                if bool(done.all()):
                    break
        return torch.stack(out, dim=1)

    def _logits(self, input_ids, positions, cache, prefill, keep=0) -> torch.Tensor:
        h = _kept(self._hidden(input_ids, positions, cache, prefill), keep)
        if self.fused_inference and self.backend == "llmcore":  # decode: the dense GEMV
            return dense(self.lm_head, h)
        return self.lm_head(h)

    def _hidden(self, input_ids, positions, cache, prefill, packed=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [B, T, dim]
        # positions lie below the cache's end, or below T (a packed row's restart); a
        # compiled step computes them (reading the host lengths would guard on them)
        end = (None if torch.compiler.is_compiling()
               else cache.end if cache is not None else input_ids.shape[1])
        cos, sin = self.rope(positions, x.dtype, end)
        if cache is not None and not prefill and packed is None:
            h = self._decoder_layers(x, cos, sin, cache)
            if h is not None:
                return h
        if self._fused_inference(x):
            return self._hidden_fused(x, cos, sin, cache, prefill, packed)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, positions, self.backend, prefill, packed)
        return self.norm(x)

    def _fused_inference(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the fused inference ops (llmcore.ops.fused): the
        llmcore backend, no gradient recorded, and a kernel for x's device and dtype, which
        the norms share. Training, autograd and backend="torch" take the module chain."""
        if not (self.fused_inference and self.backend == "llmcore"
                and not torch.is_grad_enabled() and type(self.norm) is RMSNorm
                and self.norm.weight.dtype == x.dtype
                and all(kernel_supported(op, x.device, x.dtype) for op in _FUSED_OPS)):
            return False
        for b in self.layers:
            if (type(b) is not Block or type(b.input_layernorm) is not RMSNorm
                    or type(b.post_attention_layernorm) is not RMSNorm
                    or b.input_layernorm.weight.dtype != x.dtype
                    or b.post_attention_layernorm.weight.dtype != x.dtype):
                return False
        return True

    def _decoder_layers(self, x, cos, sin, cache: KVCache) -> torch.Tensor | None:
        """Every block of a cached inference step (decode, draft verification) in one op
        call, ``llmcore::decoder_layers``: the chain of :meth:`_hidden_fused`, bit for bit,
        without the Python between its kernels. None when that op does not take this call
        (the conditions of :meth:`_fused_inference`, a CPU cache of x's dtype, no autocast,
        not under torch.compile, and a model :class:`DecoderPlan` covers)."""
        plan = self._cpu_plan(x.device, x.dtype, cache)
        if plan is None:
            return None
        return torch.ops.llmcore.decoder_layers(
            x, cos, sin, plan.weights, cache.k_values, cache.v_values, cache.k_exponents,
            cache.v_exponents, cache._seq, cache._table, 1.0 / math.sqrt(cache.head_dim))

    def _hidden_fused(self, x, cos, sin, cache, prefill, packed) -> torch.Tensor:
        """The blocks of :meth:`_hidden` through :meth:`Block.forward_fused`: each residual
        add fused into the norm after it, the final norm included."""
        layers = self.layers
        h = torch.ops.llmcore.rms_norm(x, layers[0].input_layernorm.weight,
                                       layers[0].input_layernorm.eps)
        for i, layer in enumerate(layers):
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            x, h = layer.forward_fused(x, h, nxt, cos, sin, cache, prefill, packed)
        return h

    def hidden_states(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The final normed hidden states [B, T, dim] (what the output head reads; a
        reward or value head reads them too), without a cache; ``cu_seqlens`` packs
        sequences into one row as in :meth:`forward`."""
        _check_ids(input_ids, self.config.vocab_size)
        b, t = input_ids.shape
        if cu_seqlens is None:
            if t > self.config.max_seq_len:
                raise ValueError(f"sequence of {t} tokens is longer than max_seq_len "
                                 f"{self.config.max_seq_len}")
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
            return self._hidden(input_ids, positions, None, True)
        if b != 1:
            raise ValueError(f"with cu_seqlens, input_ids must be one packed row [1, total], "
                             f"got {list(input_ids.shape)}")
        packed, positions = pack_info(cu_seqlens, t, self.config.max_seq_len, input_ids.device)
        return self._hidden(input_ids, positions.unsqueeze(0), None, True, packed)

    # -- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None,
                        quantize: str | None = None, backend: str = "llmcore",
                        tiles: bool | str = "auto", hugepages: bool | str = "auto"
                        ) -> Transformer:
        """Load a local Hugging Face Llama/Mistral/Qwen2 directory (config.json and
        safetensors weights, sharded or not; see :mod:`llmcore.models.hf`). A BFP
        checkpoint written by :meth:`save_pretrained` loads back exactly, its BFP weights
        (and BFP embedding table) taken as stored, no quantisation; ``quantize`` quantises
        a full-precision one with :meth:`quantize`'s defaults, each linear as it is read.

        The model is built on the meta device and filled one tensor at a time, each read
        from its file and dropped once converted, so the peak memory is about the loaded
        model plus one tensor. ``tiles``: as in :meth:`quantize`, for the BFP linears of a
        quantised or BFP checkpoint. ``hugepages``: as in :meth:`quantize`, for every
        tensor of the loaded model."""
        tile = _wants_tiles(tiles)  # (an unknown value fails before anything is read)
        check_hugepages(hugepages)
        ckpt = hf.open_checkpoint(path)
        if ckpt.quantized and quantize is not None:
            raise ValueError(f"{path} is already BFP-quantised; load it with quantize=None")
        with torch.device("meta"):
            model = cls(ckpt.config, backend, dtype=dtype or ckpt.dtype)
        names = {n for n, _ in model.named_modules()}  # (names only: a module held here
        for name, fmt in ckpt.quantized.items():     # would keep its loaded weights alive)
            mod = model.get_submodule(name) if name in names else None
            if type(mod) in (nn.Linear, nn.Embedding):  # a placeholder of the config's shape
                rows, cols = mod.weight.shape
                q = BFPTensor(torch.empty(rows, fmt.mantissa_cols(cols),
                                          dtype=torch.uint8 if fmt.packed else torch.int8),
                              torch.empty(rows, fmt.exponent_cols(cols), dtype=torch.uint8),
                              fmt, mod.weight.shape, mod.weight.dtype)
                _set_module(model, name, BFPEmbedding(q) if type(mod) is nn.Embedding
                            else BFPLinear.from_bfp(q, mod.bias, ckpt.act_format))
        if isinstance(model.embed_tokens, BFPEmbedding) and ckpt.config.tie_embeddings \
                and "lm_head" not in ckpt.quantized:  # one BFP matrix for the two
            model.lm_head = BFPLinear.from_bfp(model.embed_tokens.qweight, None, ckpt.act_format)
        plan = model._quantize_plan(quantize) if quantize is not None else {}
        model._load_streamed(ckpt, Path(path), device, plan,
                             "auto" if quantize is not None else None, tile)
        if tile:
            model.tile_weights()
        model._pack_if(hugepages)
        return model.eval()

    def _load_streamed(self, ckpt: hf.Checkpoint, where: Path, device, plan: dict,
                       embedding: str | None = None, tiles: bool = False) -> None:
        """Fill this meta-device model from ``ckpt`` (from :func:`hf.open_checkpoint`) one
        tensor at a time, replacing each placeholder, and quantise each linear of ``plan``
        ({name: (format, act_format)}) as soon as its tensors are in, then the embedding
        as :meth:`quantize` does (``embedding``). ``tiles``: a stored BFP weight that will
        take the GEMV tile layout takes it as it is read (the plain copy is dropped at once,
        so the peak stays one tensor above the model)."""
        tied = self.head_tied()
        hf.state_dict_from_checkpoint(ckpt, self.state_dict(), tied, where)  # checks only
        device = torch.device(device if device is not None else "cpu")
        for name, placeholder in ckpt.tensors.items():
            if (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
                continue
            owner, _, leaf = name.rpartition(".")
            mod = self.get_submodule(owner)
            if isinstance(placeholder, BFPTensor):  # into a BFPLinear, as stored
                q = ckpt.read(name, device)
                mod.weight_mantissa, mod.weight_exponent = q.mantissa, q.exponent
                head = self.lm_head  # a tied head tiles the table it shares
                if tiles and (mod.can_tile() if isinstance(mod, BFPLinear) else
                              tied and isinstance(head, BFPLinear) and head.can_tile()):
                    mod.weight_mantissa, mod.weight_exponent = tile_layout(
                        q.mantissa, q.exponent, q.format, q.shape[1])
                del q
                continue
            old = getattr(mod, leaf)
            t = ckpt.read(name, device, old.dtype)
            if isinstance(old, nn.Parameter):
                t = nn.Parameter(t, requires_grad=old.requires_grad)
            setattr(mod, leaf, t)
            if owner in plan and not any(p.is_meta for p in mod.parameters()):
                replace_linear(self, owner, *plan.pop(owner))
        if tied and isinstance(self.lm_head, BFPLinear):  # one BFP matrix, as loaded
            e = self.embed_tokens
            self.lm_head.weight_mantissa, self.lm_head.weight_exponent = (
                e.weight_mantissa, e.weight_exponent)
        elif tied:  # the head is the loaded embedding from here on
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.config).to(device)
        for name, (fmt, act) in plan.items():  # a tied head: quantised from the embedding
            replace_linear(self, name, fmt, act)
        self._compact_embedding(embedding, tied)

    def save_pretrained(self, path: str) -> None:
        """Write config.json and model.safetensors in Hugging Face layout (BFP weights
        included); see :mod:`llmcore.models.hf`."""
        tied = self.head_tied()
        bfp = {n: m for n, m in self.named_modules() if isinstance(m, (BFPLinear, BFPEmbedding))
               and not (tied and n == "lm_head")}
        act = next((m.act_format for m in bfp.values()
                    if isinstance(m, BFPLinear) and m.act_format is not None), None)
        hf.write_checkpoint(path, self.config, self.dtype, self.state_dict(),
                            {n: m.qweight for n, m in bfp.items()}, act, tied=tied)

    # -- quantised and truncated models --------------------------------------------------
    def quantize(self, format: str = "mxint8", act_format: str | None = "auto",
                 exclude=(), lm_head: str | None = "auto", embedding: str | None = "auto",
                 tiles: bool | str = "auto", hugepages: bool | str = "auto") -> Transformer:
        """Replace the linear layers by frozen BFP linears (in place).

        ``act_format`` sets how activations meet the BFP weights. ``"auto"`` (the default)
        quantises them to MXINT8 on the fly for every layer whose weight has blocks of 32
        (mxint8, mxint4): integer block products, the fast CPU decode path, off from the
        exact product by at most one MXINT8 unit of x per element (docs/bfp.md gives the
        bound; about 0.5-1% of the output's norm). Other weight formats stay weight-only.
        ``None`` keeps every layer weight-only (x stays float: exact up to fp32
        accumulation); a format name forces that activation format everywhere.

        ``format`` applies to the attention and MLP projections. ``lm_head`` sets the
        output head: ``"auto"`` (the default) uses ``format`` when it has 8-bit mantissas
        or more and ``"mxint8"`` below that (as llama.cpp keeps its output matrix at 8 bits
        in 4-bit models: the head is the most sensitive matrix), a format name forces one,
        and ``None`` keeps it in full precision. The head holds a large share of the bytes
        read per decode step (a third of a 124M model), so quantising it is what makes
        decoding fast. ``exclude`` lists further module names or glob patterns to leave
        alone.

        ``embedding`` sets the input embedding table (:class:`~llmcore.nn.BFPEmbedding`: a
        lookup dequantises only the rows it gathers). ``"auto"`` (the default) stores it in
        the head's format once the head is quantised: a head tied to the embedding then
        stays tied, one BFP matrix for both (as llama.cpp keeps one quantised table), and
        an untied one is quantised beside it. The token vectors then carry the head's
        rounding error (measured in docs/bfp.md). ``None`` keeps the table in full
        precision (a tied head is then untied: a BFP copy for the head), and a format name
        forces one.

        ``tiles`` stores the int8-activation weights in the CPU's GEMV tile layout
        (:meth:`tile_weights`): ``"auto"`` (the default) does when the model is on a CPU
        whose kernels read it directly (AVX-512 VNNI), True wherever it applies (elsewhere
        the kernels unpack the tiles per call), False never.

        ``hugepages`` then moves every parameter and buffer of the model into one arena of
        2 MB pages (:meth:`pack_hugepages`): ``"auto"`` (the default) does on the CPU
        where the system gives such pages (:func:`llmcore.ops.memory.hugepages_enabled`)
        for a model of 2 MB or more, True on the CPU always, False never.
        """
        if embedding not in (None, "auto"):
            get_format(embedding)  # an unknown name fails before anything is replaced
        tile = _wants_tiles(tiles)
        check_hugepages(hugepages)  # (an unknown value fails before anything changes)
        tied = self.head_tied()
        for name, (fmt, act) in self._quantize_plan(format, act_format, exclude,
                                                    lm_head).items():
            replace_linear(self, name, fmt, act)
        self._compact_embedding(embedding, tied)
        if tile:
            self.tile_weights()
        self._pack_if(hugepages)
        return self

    # -- host memory -----------------------------------------------------------------------
    def pack_hugepages(self) -> int:
        """Move every CPU parameter and buffer into one new arena of 2 MB pages, in the
        order a forward reads them (:func:`llmcore.ops.memory.pack_hugepages`; in place:
        the tensors keep their identity and values, only their storage moves). A decode
        step streams every weight once, and from 4 KB pages the hardware prefetchers stop
        at each page boundary: on this project's AMD EPYC VM the packed 110M MXINT8 model
        decoded 1.29x faster on one thread and 1.06x on two (docs/memory.md).
        :meth:`from_pretrained` and :meth:`quantize` call it on the CPU by default; call
        it again after replacing tensors yourself. Returns the bytes moved."""
        n = _pack_hugepages(self)
        self._plan = None  # (the plan holds the same tensor objects; rebuilt at once)
        return n

    def _pack_if(self, hugepages: bool | str) -> None:
        """:meth:`pack_hugepages` as a ``hugepages`` argument says (see :meth:`quantize`)."""
        if wants_hugepages(hugepages, self.device, packed_bytes(module_tensors(self))):
            self.pack_hugepages()

    # -- the GEMV tile layout --------------------------------------------------------------
    def tile_weights(self) -> int:
        """Store every frozen BFP linear with int8 activations that can take it
        (:meth:`BFPLinear.can_tile`) in the GEMV tile layout, in place: the same bytes
        reordered so that the CPU decode kernels read each weight as one stream (a decode
        step and, above all, a verification step of assisted generation get faster;
        docs/bfp.md). A head tied to the BFP embedding stays tied: the lookup reads the
        tiles. Saving, ``state_dict`` and ``qweight`` still see the plain layout. Returns the
        number of layers tiled."""
        return self._switch_layout(BFPLinear.can_tile, BFPLinear.tile_)

    def untile_weights(self) -> int:
        """Back to the plain layout everywhere (in place); returns the number of layers."""
        return self._switch_layout(lambda m: m.tiled, BFPLinear.untile_)

    def _switch_layout(self, applies, switch) -> int:
        """switch(m) for every BFPLinear m where applies(m); a head tied to the embedding
        stays tied (the embedding takes the head's new buffers). Returns the count."""
        tied = self.head_tied()
        n = 0
        for m in self.modules():
            if isinstance(m, BFPLinear) and applies(m):
                switch(m)
                n += 1
        if tied and n and isinstance(self.lm_head, BFPLinear):
            e = self.embed_tokens
            e.weight_mantissa, e.weight_exponent = (self.lm_head.weight_mantissa,
                                                    self.lm_head.weight_exponent)
        return n

    def _compact_embedding(self, embedding: str | None, tied: bool) -> None:
        """Store a full-precision input embedding as BFP (see :meth:`quantize`); ``tied``:
        the head was tied to it before the head was quantised."""
        if embedding is None or type(self.embed_tokens) is not nn.Embedding:
            return
        head = self.lm_head
        frozen_head = isinstance(head, BFPLinear) and head.weight is None
        if embedding == "auto":
            if not frozen_head:  # the head stays full precision (or trainable): so does this
                return
            fmt = head.format
        else:
            fmt = get_format(embedding)
        if tied and frozen_head and head.format == fmt:
            self.embed_tokens = BFPEmbedding(head.qweight)
        else:
            self.embed_tokens = BFPEmbedding.from_embedding(self.embed_tokens, fmt)

    def _quantize_plan(self, format: str = "mxint8", act_format: str | None = "auto",
                       exclude=(), lm_head: str | None = "auto") -> dict:
        """{linear name: (format, act_format)} that :meth:`quantize` replaces."""
        if isinstance(exclude, str):
            exclude = (exclude,)
        fmt = get_format(format)
        if lm_head == "auto":
            lm_head = fmt if fmt.mantissa_bits >= 8 else get_format("mxint8")
        elif lm_head is not None:
            lm_head = get_format(lm_head)
        plan = {name: (fmt, _act_for(fmt, act_format)) for name, m in self.named_modules()
                if type(m) is nn.Linear and not _excluded(name, (*exclude, "lm_head"))}
        if lm_head is not None and "lm_head" not in exclude and type(self.lm_head) is nn.Linear:
            plan["lm_head"] = (lm_head, _act_for(lm_head, act_format))
        return plan

    def quantized(self, format: str = "mxint8", act_format: str | None = "auto", exclude=(),
                  lm_head: str | None = "auto", hugepages: bool | str = "auto") -> Transformer:
        """A copy with BFP linears (:meth:`quantize` on a copy, ``embedding=None``); this
        model is untouched. The embedding table and the RoPE frequencies are shared with
        this model, not copied (a head tied to the embedding stays tied until ``lm_head``
        quantises it): a quantised copy used as a draft costs only its BFP linears.
        ``hugepages`` (as in :meth:`quantize`) packs the copy's own tensors only: the
        shared ones stay where this model keeps them."""
        if any(isinstance(m, BFPLinear) for m in self.modules()):
            raise ValueError("quantized() needs a model with full-precision linears (this one "
                             "is already quantised)")
        check_hugepages(hugepages)  # (an unknown value fails before the copy)
        emb = self.embed_tokens
        shared = {id(emb): emb, id(emb.weight): emb.weight, id(self.inv_freq): self.inv_freq}
        q = copy.deepcopy(self, memo=shared).quantize(format, act_format, exclude, lm_head,
                                                      embedding=None, hugepages=False)
        own = [t for t in module_tensors(q) if id(t) not in shared]
        if wants_hugepages(hugepages, q.device, packed_bytes(own)):
            pack_tensors(own)
            q._plan = None
        return q

    def truncated(self, n_layers: int) -> Transformer:
        """The first ``n_layers`` blocks, the final norm and the output head as a model of
        their own (early exit, as LayerSkip drafts). Every module and buffer is shared with
        this model: no memory, and later changes to one show in the other."""
        n_total = self.config.n_layers
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) \
                or not 1 <= n_layers < n_total:
            raise ValueError(f"n_layers must be an int in [1, {n_total}), got {n_layers!r}")
        with torch.device("meta"):
            out = Transformer(replace(self.config, n_layers=n_layers), self.backend,
                              dtype=self.dtype)
        out.embed_tokens, out.norm, out.lm_head = self.embed_tokens, self.norm, self.lm_head
        out.layers = nn.ModuleList(self.layers[:n_layers])
        out.inv_freq = self.inv_freq
        return out.train(self.training)
