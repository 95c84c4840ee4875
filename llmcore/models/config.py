"""TransformerConfig: the shape of a Llama-family decoder, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


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
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

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
