"""KVCache: the keys and values of every layer for a batch of sequences (DESIGN §2.4).

One buffer per K and V holds all layers (``[layers, batch, max_seq, kv_heads, head_dim]``,
or with paging ``[layers, num_pages, page_size, kv_heads, head_dim]`` plus a block table
shared by the layers). Storage is a float dtype or MXINT8 (int8 mantissas + one E8M0
exponent per 32 elements of head_dim: about half the bytes of fp16). Lengths are tracked
on the host, so every check is free and the kernels are called with ``validate=False``.

A forward step over T new tokens::

    pos = cache.prepare(T)            # [batch, T] positions (for RoPE); reserves pages
    for layer ...:
        cache.append(layer, k, v)      # k, v: [batch, T, kv_heads, head_dim]
        out = cache.attend(layer, q)   # q: [batch, T, heads, head_dim]
    cache.commit()                    # lengths += T

``rollback(lengths)`` truncates sequences (speculative decoding rejected tokens; pages
past the new end go back to the pool), ``reset()`` empties the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmcore.formats import get_format
from llmcore.ops.bfp import BFPTensor
from llmcore.ops.decode import decode_attention, kv_cache_append

STORAGES = ("native", "mxint8")


class KVCache:
    """Keys and values of ``n_layers`` layers for ``batch_size`` sequences.

    Parameters
    ----------
    n_layers, batch_size, max_seq_len, n_kv_heads, head_dim : int
    dtype : torch.dtype
        Dtype of the new tokens (and of the storage when ``storage="native"``).
    device : str or torch.device
    storage : {"native", "mxint8"}
    page_size : int, optional
        Enables paging: memory is allocated in pages of ``page_size`` positions, taken
        from a pool of ``num_pages`` (default: enough for every sequence at
        ``max_seq_len``) as sequences grow, and returned on rollback/reset.
    num_pages : int, optional
    """

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 storage: str = "native", page_size: int | None = None,
                 num_pages: int | None = None):
        for name, val in (("n_layers", n_layers), ("batch_size", batch_size),
                          ("max_seq_len", max_seq_len), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.n_layers, self.batch_size, self.max_seq_len = n_layers, batch_size, max_seq_len
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.device, self.storage = torch.device(device), storage
        self.page_size = page_size
        self._lengths = [0] * batch_size
        self._pending = 0
        if page_size is not None:
            if not isinstance(page_size, int) or page_size < 1:
                raise ValueError(f"page_size must be a positive int, got {page_size!r}")
            self.max_pages = -(-max_seq_len // page_size)
            self.num_pages = num_pages if num_pages is not None else batch_size * self.max_pages
            if self.num_pages < 1:
                raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
            lead = (n_layers, self.num_pages, page_size)
            self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() -> 0, 1, ..
            self._pages: list[list[int]] = [[] for _ in range(batch_size)]
            self.block_table = torch.zeros(batch_size, self.max_pages, dtype=torch.int32,
                                           device=self.device)
        else:
            if num_pages is not None:
                raise ValueError("num_pages needs page_size")
            lead = (n_layers, batch_size, max_seq_len)
            self.block_table = None
        shape = (*lead, n_kv_heads, head_dim)
        if storage == "mxint8":
            fmt = get_format("mxint8")
            eshape = (*lead, n_kv_heads, fmt.exponent_cols(head_dim))
            self.k = (torch.zeros(shape, dtype=torch.int8, device=self.device),
                      torch.zeros(eshape, dtype=torch.uint8, device=self.device))
            self.v = (torch.zeros(shape, dtype=torch.int8, device=self.device),
                      torch.zeros(eshape, dtype=torch.uint8, device=self.device))
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)

    # -- lengths ---------------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        """Committed length of each sequence."""
        return list(self._lengths)

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [batch] on the cache's device: committed lengths."""
        return self._seqlens

    def nbytes(self) -> int:
        parts = (*self.k, *self.v) if self.storage == "mxint8" else (self.k, self.v)
        return sum(t.numel() * t.element_size() for t in parts)

    def _set_lengths(self, lengths: Sequence[int]) -> None:
        self._lengths = [int(x) for x in lengths]
        self._seqlens = torch.tensor(self._lengths, dtype=torch.int32, device=self.device)

    # -- a step ----------------------------------------------------------------------------
    def prepare(self, num_new: int) -> torch.Tensor:
        """Reserve room for ``num_new`` tokens per sequence; returns their positions
        [batch, num_new] (int64, for RoPE)."""
        if not isinstance(num_new, int) or num_new < 1:
            raise ValueError(f"num_new must be a positive int, got {num_new!r}")
        if self._pending:
            raise RuntimeError("prepare() called twice without commit()")
        longest = max(self._lengths) + num_new
        if longest > self.max_seq_len:
            raise ValueError(f"{num_new} new tokens would make a sequence {longest} long, past "
                             f"max_seq_len={self.max_seq_len}")
        if self.page_size is not None:
            self._reserve_pages(num_new)
        self._pending = num_new
        start = self._seqlens.to(torch.int64).unsqueeze(1)
        return start + torch.arange(num_new, device=self.device).unsqueeze(0)

    def _reserve_pages(self, num_new: int) -> None:
        need = [-(-(n + num_new) // self.page_size) - len(p)
                for n, p in zip(self._lengths, self._pages, strict=True)]
        if sum(need) > len(self._free):
            raise RuntimeError(f"KV cache out of pages: need {sum(need)} more, "
                               f"{len(self._free)} free of {self.num_pages}")
        for b, n in enumerate(need):
            for _ in range(n):
                page = self._free.pop()
                self.block_table[b, len(self._pages[b])] = page
                self._pages[b].append(page)

    def _layer(self, pair, layer: int):
        if self.storage == "mxint8":
            m, e = pair[0][layer], pair[1][layer]
            return BFPTensor(m, e, "mxint8", tuple(m.shape), self.dtype)
        return pair[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's k, v [batch, num_new, kv_heads, head_dim] for ``layer``."""
        if not self._pending:
            raise RuntimeError("append() needs prepare(num_new) first")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        want = (self.batch_size, self._pending, self.n_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must have shape {list(want)}, got {list(k.shape)} and "
                             f"{list(v.shape)}")
        kv_cache_append(self._layer(self.k, layer), self._layer(self.v, layer),
                        k.to(self.dtype), v.to(self.dtype), self._seqlens, self.block_table,
                        validate=False)

    def attend(self, layer: int, q: torch.Tensor, softmax_scale: float | None = None
               ) -> torch.Tensor:
        """decode_attention of q [batch, num_new, heads, head_dim] over ``layer``'s cache
        (committed tokens + this step's)."""
        if not self._pending:
            raise RuntimeError("attend() needs prepare(num_new) and append() first")
        if q.shape[1] != self._pending:
            raise ValueError(f"q must have {self._pending} new tokens, got shape {list(q.shape)}")
        return decode_attention(q.to(self.dtype), self._layer(self.k, layer),
                                self._layer(self.v, layer), self._seqlens + self._pending,
                                softmax_scale, self.block_table, validate=False)

    def commit(self) -> None:
        """Make this step's tokens part of every sequence."""
        if not self._pending:
            raise RuntimeError("commit() without prepare()")
        n = self._pending
        self._pending = 0
        self._set_lengths([x + n for x in self._lengths])

    # -- shrinking ---------------------------------------------------------------------------
    def rollback(self, lengths: int | Sequence[int] | torch.Tensor) -> None:
        """Truncate sequences to ``lengths`` (one int for all, or one per sequence); each
        must be <= its current length. Pages past the new ends return to the pool."""
        if self._pending:
            raise RuntimeError("rollback() in the middle of a step (call commit() first)")
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if isinstance(lengths, int):
            lengths = [lengths] * self.batch_size
        lengths = list(lengths)
        if len(lengths) != self.batch_size:
            raise ValueError(f"lengths must have {self.batch_size} entries, got {len(lengths)}")
        for b, (new, old) in enumerate(zip(lengths, self._lengths, strict=True)):
            if not 0 <= new <= old:
                raise ValueError(f"rollback length of sequence {b} must be in [0, {old}], got {new}")
        if self.page_size is not None:
            for b, new in enumerate(lengths):
                keep = -(-new // self.page_size)
                while len(self._pages[b]) > keep:
                    self._free.append(self._pages[b].pop())
        self._set_lengths(lengths)

    def reset(self) -> None:
        """Empty every sequence (buffers are kept; pages return to the pool)."""
        self._pending = 0
        self.rollback([0] * self.batch_size)

    def __repr__(self) -> str:
        paging = f", page_size={self.page_size}, num_pages={self.num_pages}" if self.page_size else ""
        return (f"KVCache(layers={self.n_layers}, batch={self.batch_size}, "
                f"max_seq_len={self.max_seq_len}, kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, storage={self.storage}, dtype={self.dtype}{paging}, "
                f"lengths={self._lengths})")
