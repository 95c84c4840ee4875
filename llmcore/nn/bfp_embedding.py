"""A token embedding whose table is stored in a BFP format (docs/bfp.md).

The table [num_embeddings, embedding_dim] lives as BFP mantissas and exponents, the same
bytes as a BFP output head of that shape; a lookup gathers the rows of the asked ids and
dequantises only them. A model whose head is tied to its embedding keeps one BFP matrix
for both (:meth:`llmcore.models.Transformer.quantize`), as llama.cpp keeps one quantised
``token_embd`` tensor: the embedding no longer costs a full-precision copy of the largest
matrix of a small model.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcore.formats import BFPFormat, get_format
from llmcore.nn.bfp_linear import (
    _cpu_kernel,
    _is_tiled,
    _plain_state_dict,
    _plain_weight,
    _tiled_load,
)
from llmcore.ops.bfp import BFPTensor, bfp_dequantize, bfp_quantize, tile_rows


class BFPEmbedding(nn.Module):
    """Drop-in ``nn.Embedding`` (lookup only, frozen) with a BFP table.

    ``forward(ids)`` returns the dequantised rows [*ids.shape, embedding_dim] in the table's
    dtype: exactly ``qweight.dequantize()[ids]``. Ids outside ``[0, num_embeddings)``
    raise IndexError, as in ``nn.Embedding``.
    """

    def __init__(self, weight: BFPTensor):
        super().__init__()
        if not isinstance(weight, BFPTensor) or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D BFPTensor, got {weight!r}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.format: BFPFormat = weight.format
        self.weight_dtype = weight.dtype
        self.register_buffer("weight_mantissa", weight.mantissa)
        self.register_buffer("weight_exponent", weight.exponent)
        # A table shared with a tied head in the GEMV tile layout (Transformer.tile_weights)
        # is looked up from the tiles; state_dict and qweight see the plain layout.
        self._register_state_dict_hook(_plain_state_dict)
        self._register_load_state_dict_pre_hook(_tiled_load, with_module=True)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, format: str | BFPFormat = "mxint8"
                       ) -> BFPEmbedding:
        """Quantise an ``nn.Embedding``'s table (the original is untouched)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        w = embedding.weight.detach()
        q = bfp_quantize(w, get_format(format))  # from its own dtype: no fp32 copy
        return cls(BFPTensor(q.mantissa, q.exponent, q.format, q.shape, w.dtype))

    @property
    def qweight(self) -> BFPTensor:
        """The BFP table [num_embeddings, embedding_dim]."""
        m, e = _plain_weight(self)
        return BFPTensor(m, e, self.format, (self.num_embeddings, self.embedding_dim),
                         self.weight_dtype)

    @property
    def _bfp_k(self) -> int:
        return self.embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return self.weight_mantissa.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [...] -> [..., dim]
        f = self.format
        if (ids.device.type == "cpu" and self.weight_mantissa.device.type == "cpu"
                and _cpu_kernel("bfp_embedding", self.weight_dtype)):
            # The per-token path: one op gathers the rows from either layout and checks the
            # ids (IndexError), with no OpenMP region for a handful of them.
            return torch.ops.llmcore.bfp_embedding(self.weight_mantissa, self.weight_exponent,
                                                   ids, f.mantissa_bits, f.block_size,
                                                   self.embedding_dim, self.weight_dtype)
        flat = ids.reshape(-1)
        if not torch.compiler.is_compiling() and flat.numel() \
                and bool(((flat < 0) | (flat >= self.num_embeddings)).any()):
            # (index_select raises IndexError on the CPU itself; elsewhere it would assert)
            raise IndexError(f"ids must lie in [0, {self.num_embeddings}) (the table's rows)")
        if _is_tiled(self):
            m, e = tile_rows(self.weight_mantissa, self.weight_exponent, f,
                             self.embedding_dim, flat)
        else:
            m = self.weight_mantissa.index_select(0, flat)
            e = self.weight_exponent.index_select(0, flat)
        y = bfp_dequantize(BFPTensor(m, e, f, (flat.numel(), self.embedding_dim),
                                     self.weight_dtype), self.weight_dtype)
        return y.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, format={self.format.name}, "
                f"dtype={str(self.weight_dtype).removeprefix('torch.')}")
