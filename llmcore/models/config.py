"""TransformerConfig: the shape of a Llama-family decoder, with named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

# Upper bound of every size field: beyond it a tensor (or an int32 index) cannot hold it,
# and a typo (vocab_size=10**13) would otherwise surface as an allocator error.
MAX_SIZE = 2**31 - 1
_SIZE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim",
                "max_seq_len", "head_dim")
# The keys each rope_scaling type needs (Hugging Face names), all positive numbers.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_model_dtype(dtype) -> None:
    """Raise ValueError unless ``dtype`` is None or a floating-point torch dtype (the
    dtype of a model's weights)."""
    is_float = getattr(dtype, "is_floating_point", False) is True
    if dtype is not None and not is_float:
        raise ValueError(f"dtype must be a floating-point torch dtype (torch.float32, "
                         f"torch.bfloat16, torch.float16), got {dtype!r}")


def check_rope_scaling(scaling, where: str = "rope_scaling") -> None:
    """Raise ValueError unless ``scaling`` is None or a supported, complete rope_scaling
    dict (``rope_type`` or ``type``: default, linear, llama3) with positive finite numbers."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"{where} must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}: unsupported rope_scaling type {kind!r} (supported: "
                         "default, linear, llama3)")
    for key in ROPE_SCALING_KEYS[kind]:
        v = scaling.get(key)
        if v is None:
            raise ValueError(f"{where}: {kind} scaling needs {key!r}")
        if not _is_real(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{where}[{key!r}] must be a finite number > 0, got {v!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor ({scaling['high_freq_factor']}) must be "
                         f"greater than low_freq_factor ({scaling['low_freq_factor']})")


@dataclass
class TransformerConfig:
    """Shapes and options of a Llama/Mistral/Qwen2-style decoder (RMSNorm, RoPE, SwiGLU,
    grouped-query attention)."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (multi-head attention)
    vocab_size: int = 256
    ffn_dim: int = 176
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF form: {"rope_type": "llama3"|"linear", "factor": ..}
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    head_dim: int | None = None  # None: dim // n_heads
    extra: dict = field(default_factory=dict)  # model-specific keys kept for save_pretrained

    def __post_init__(self):
        """Every field is range-checked here, so a bad value fails at the door with a
        ValueError naming it (never a ZeroDivisionError, NaN logits or an allocator error
        later)."""
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in _SIZE_FIELDS:
            v = getattr(self, name)
            if v is None and name == "head_dim":
                continue
            if not _is_int(v) or not 1 <= v <= MAX_SIZE:
                raise ValueError(f"{name} must be an integer in [1, {MAX_SIZE}], got {v!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("tie_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides) -> TransformerConfig:
        """A preset by name (``tiny``, ``124M``, ``1B``, ``7B``), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def num_params(self, embeddings: bool = True) -> int:
        d, h, hd, kv = self.dim, self.n_heads, self.head_dim, self.n_kv_heads
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        per_layer = attn + 3 * d * self.ffn_dim + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2) if embeddings else 0
        return self.n_layers * per_layer + d + emb


PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                              ffn_dim=176, max_seq_len=512),
    # GPT-2 small shape in Llama form (about 124M parameters with tied embeddings).
    "124M": TransformerConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                              vocab_size=50304, ffn_dim=2048, max_seq_len=1024,
                              tie_embeddings=True),
    # Llama-3.2-1B shape.
    "1B": TransformerConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                            ffn_dim=8192, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                            tie_embeddings=True,
                            rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # Mistral-7B shape.
    "7B": TransformerConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000,
                            ffn_dim=14336, rope_theta=1000000.0, max_seq_len=32768),
}
