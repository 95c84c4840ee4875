"""A Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) on llmcore ops.

``backend="llmcore"`` runs attention through :func:`llmcore.ops.attention` (prefill) and
:class:`~llmcore.models.KVCache` / ``decode_attention`` (cached steps), and BFP linears
when quantised; ``backend="torch"`` runs the same weights through plain PyTorch (SDPA and
F.linear, a dense cache written by indexing) so any path can be A/B-compared in one
process. Parameter names follow Hugging Face's Llama (without the ``model.`` prefix), so
checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcore import ops
from llmcore.models.config import TransformerConfig
from llmcore.models.kv_cache import KVCache

BACKENDS = ("llmcore", "torch")


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

    def forward(self, x, cos, sin, cache: KVCache | None, positions, backend: str):
        b, t, _ = x.shape  # x: [B, T, dim]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        # [B, T, 1, hd], in the projections' dtype: under autocast they are bf16 while the
        # residual stream (and so cos/sin) stays fp32, and q, k, v must share a dtype
        cos, sin = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is None:
            o = self._dense(q, k, v, backend)
        elif backend == "llmcore":
            cache.append(self.layer, k, v)
            if max(cache.lengths) == 0:  # prefill of an empty cache: plain causal attention
                o = ops.attention(q, k, v, causal=True)
            else:
                o = cache.attend(self.layer, q)
        else:
            o = self._torch_cached(q, k, v, cache, positions)
        return self.o_proj(o.reshape(b, t, -1))

    def _dense(self, q, k, v, backend):
        if backend == "llmcore":
            return ops.attention(q, k, v, causal=True)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return o.transpose(1, 2)

    def _torch_cached(self, q, k, v, cache: KVCache, positions):
        """Plain PyTorch over a native contiguous KVCache: index writes and masked SDPA."""
        if cache.storage != "native" or cache.page_size is not None:
            raise ValueError("backend='torch' needs a native, non-paged KVCache")
        b, t = positions.shape
        rows = torch.arange(b, device=q.device).unsqueeze(1)
        kc, vc = cache.k[self.layer], cache.v[self.layer]  # [B, S, Hkv, hd]
        kc[rows, positions] = k.to(kc.dtype)
        vc[rows, positions] = v.to(vc.dtype)
        n = int(positions.max().item()) + 1
        keys = torch.arange(n, device=q.device)
        mask = keys.view(1, 1, n) <= positions.unsqueeze(-1)  # [B, T, n]: causal + own length
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :n].transpose(1, 2).to(q.dtype),
                                           vc[:, :n].transpose(1, 2).to(q.dtype),
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


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.self_attn = Attention(cfg, layer, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x, cos, sin, cache, positions, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """``model(input_ids)`` -> logits [B, T, vocab]; ``model(input_ids, cache=cache)``
    appends the new tokens to ``cache`` and returns their logits."""

    def __init__(self, config: TransformerConfig, backend: str = "llmcore", device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config, self.backend = config, backend
        kw = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, **kw)
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device, dtype)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, **kw)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, storage: str = "native",
                  page_size: int | None = None) -> KVCache:
        """A KVCache shaped for this model."""
        c = self.config
        return KVCache(c.n_layers, batch_size, max_seq_len or c.max_seq_len, c.n_kv_heads,
                       c.head_dim, dtype=self.dtype, device=self.device, storage=storage,
                       page_size=page_size)

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                             f"{input_ids.dtype} {list(input_ids.shape)}")
        b, t = input_ids.shape
        if cache is None:
            if t > self.config.max_seq_len:
                raise ValueError(f"sequence of {t} tokens is longer than max_seq_len "
                                 f"{self.config.max_seq_len}")
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        else:
            if cache.batch_size != b:
                raise ValueError(f"cache holds {cache.batch_size} sequences, input_ids {b}")
            positions = cache.prepare(t)
        x = self.embed_tokens(input_ids)  # [B, T, dim]
        cos, sin = self.rope(positions, x.dtype)
        try:
            for layer in self.layers:
                x = layer(x, cos, sin, cache, positions, self.backend)
        except BaseException:
            if cache is not None:  # leave the cache as it was
                cache.commit()
                cache.rollback([n - t for n in cache.lengths])
            raise
        if cache is not None:
            cache.commit()
        return self.lm_head(self.norm(x))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None,
                        quantize: str | None = None, backend: str = "llmcore") -> Transformer:
        """Load a local Hugging Face Llama/Mistral/Qwen2 directory (config.json and
        safetensors weights, sharded or not); see :mod:`llmcore.models.hf`."""
        from llmcore.models.hf import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, quantize=quantize,
                               backend=backend)

    def save_pretrained(self, path: str) -> None:
        """Write config.json and model.safetensors in Hugging Face layout (BFP weights
        included); see :mod:`llmcore.models.hf`."""
        from llmcore.models.hf import save_pretrained

        save_pretrained(self, path)

    def quantize(self, format: str = "mxint8", act_format: str | None = None,
                 exclude=(), lm_head: str | None = "auto") -> Transformer:
        """Replace the linear layers by frozen BFP linears (in place).

        ``format`` applies to the attention and MLP projections. ``lm_head`` sets the
        output head: ``"auto"`` (the default) uses ``format`` when it has 8-bit mantissas
        or more and ``"mxint8"`` below that (as llama.cpp keeps its output matrix at 8 bits
        in 4-bit models: the head is the most sensitive matrix), a format name forces one,
        and ``None`` keeps it in full precision. The head holds a large share of the bytes
        read per decode step (a third of a 124M model), so quantising it is what makes
        decoding fast. A head tied to the input embedding is untied first: the embedding
        table stays in full precision for the token lookup. ``exclude`` lists further
        module names or glob patterns to leave alone.
        """
        from llmcore.formats import get_format
        from llmcore.nn import BFPLinear, quantize_model

        if isinstance(exclude, str):
            exclude = (exclude,)
        fmt = get_format(format)
        if lm_head == "auto":
            lm_head = fmt if fmt.mantissa_bits >= 8 else get_format("mxint8")
        elif lm_head is not None:
            lm_head = get_format(lm_head)
        quantize_model(self, fmt, act_format, exclude=(*exclude, "lm_head"))
        if lm_head is not None and "lm_head" not in exclude and type(self.lm_head) is nn.Linear:
            if self.lm_head.weight is self.embed_tokens.weight:
                self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())
            self.lm_head = BFPLinear.from_linear(self.lm_head, lm_head, act_format)
        return self
