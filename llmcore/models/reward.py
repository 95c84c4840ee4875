"""A reward model: the decoder with a scalar head on the last token of each sequence.

The layout is Hugging Face's ``LlamaForSequenceClassification`` (and the Mistral / Qwen2
equivalents) with ``num_labels = 1``: the decoder's weights under ``model.``, the head as
``score.weight`` [1, hidden], no language-model head. A directory written by
:meth:`RewardModel.save_pretrained` loads in ``transformers`` with
``AutoModelForSequenceClassification`` and gives the same scores; one written by
``transformers`` loads here.

The score of a sequence is the head applied to the final normed hidden state of its last
token: the last position of each packed sequence, or of each row. With an
``attention_mask`` the real tokens of each row (mask 1) are packed and scored as sequences
of their own, so padding on either side (or anywhere) changes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from llmcore.models import hf
from llmcore.models.config import TransformerConfig
from llmcore.models.transformer import Transformer, pack_info, rope_inv_freq


class RewardModel(Transformer):
    """``rm(input_ids, attention_mask=None)`` -> rewards [B] (fp32);
    ``rm(input_ids [1, total], cu_seqlens=cu)`` -> rewards [n] of packed sequences."""

    def __init__(self, config: TransformerConfig, backend: str = "llmcore", device=None,
                 dtype: torch.dtype | None = None):
        super().__init__(config, backend=backend, device=device, dtype=dtype)
        self.lm_head = nn.Identity()  # no vocabulary head: the hidden states feed ``score``
        self.score = nn.Linear(config.dim, 1, bias=False, device=device, dtype=dtype)

    def _tie_and_rope(self) -> None:
        if isinstance(self.lm_head, nn.Identity):  # nothing to tie: only the RoPE table
            self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)
        else:  # inside Transformer.__init__, before the head is replaced
            super()._tie_and_rope()

    @classmethod
    def from_backbone(cls, model: Transformer, init_std: float | None = None) -> RewardModel:
        """A reward model whose decoder is a copy of ``model``'s (its language-model head
        dropped) and whose head is drawn from normal(0, 1/sqrt(dim + 1)), as TRL's value
        head. ``model`` itself is untouched."""
        if isinstance(model, RewardModel):
            raise ValueError("model is already a reward model")
        if type(model.lm_head) is not nn.Linear:
            raise ValueError("from_backbone needs a model with a full-precision head (quantise "
                             "the reward model after building it)")
        with torch.device("meta"):
            rm = cls(model.config, backend=model.backend, dtype=model.dtype)
        rm = rm.to_empty(device=model.device)
        rm._tie_and_rope()
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = rm.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"score.weight"}:
            raise ValueError(f"cannot build a reward model from this model: missing {missing}, "
                             f"unexpected {unexpected}")
        std = init_std if init_std is not None else 1.0 / math.sqrt(model.config.dim + 1)
        with torch.no_grad():
            rm.score.weight.normal_(0.0, std)
        return rm.train(model.training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (fp32) of each sequence: [B] for a batch, [n] for packed sequences."""
        if attention_mask is not None:  # the real tokens of each row, packed: exact for
            return self._score_masked(input_ids, attention_mask)  # any padding side
        h = self.hidden_states(input_ids, cu_seqlens=cu_seqlens)  # [B, T, dim]
        if cu_seqlens is None:
            return self.score(h[:, -1]).squeeze(-1).float()
        packed, _ = pack_info(cu_seqlens, input_ids.shape[1], device=h.device)
        return self.score(h[0, packed.cu_seqlens[1:].long() - 1]).squeeze(-1).float()

    def _score_masked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(attention_mask.shape)} must have the shape "
                             f"of input_ids {list(input_ids.shape)}")
        real = attention_mask.to(input_ids.device).bool()
        lens = real.sum(-1)
        if not bool((lens > 0).all()):
            raise ValueError("attention_mask: every sequence needs at least one real token")
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=input_ids.device)
        cu[1:] = lens.cumsum(0)
        return self.forward(input_ids[real].unsqueeze(0), cu_seqlens=cu)

    def step(self, *args, **kwargs):
        raise TypeError("a reward model scores sequences; it has no cached decoding step")

    def new_cache(self, *args, **kwargs):
        raise TypeError("a reward model scores sequences; it has no KV cache")

    # -- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None,
                        backend: str = "llmcore") -> RewardModel:
        """Load a reward-model directory (``*ForSequenceClassification``, num_labels 1)."""
        ckpt = hf.read_checkpoint(path, device, reward=True)
        if ckpt.quantized:
            raise ValueError(f"{path}: BFP-quantised reward models are not supported; save it "
                             "in full precision")
        labels = ckpt.hf_config.get("num_labels", len(ckpt.hf_config.get("id2label") or {1: 0}))
        if labels != 1:
            raise ValueError(f"{Path(path) / 'config.json'}: a reward model has one label, "
                             f"this one has num_labels={labels}")
        model = cls.empty(ckpt.config, backend, device, dtype or ckpt.dtype)
        state = hf.state_dict_from_checkpoint(ckpt, model.state_dict(), False, Path(path))
        model.load_state_dict(state, strict=True)
        return model.eval()

    def save_pretrained(self, path: str) -> None:
        """Write config.json and model.safetensors (HF *ForSequenceClassification layout)."""
        hf.write_checkpoint(path, self.config, self.dtype, self.state_dict(), reward=True)


__all__ = ["RewardModel"]
