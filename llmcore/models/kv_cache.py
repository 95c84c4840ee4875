"""KVCache: the keys and values of every layer for a batch of sequences.

An ``nn.Module`` whose buffers live on the model's device: one buffer per K and V holds all
layers (``[layers, batch, max_seq, kv_heads, head_dim]``, or with paging ``[layers,
num_pages, page_size, kv_heads, head_dim]`` plus a block table shared by the layers), and
``seqlens`` (int32 [batch]) holds each sequence's committed length. Storage is a float
dtype or MXINT8 (int8 mantissas + one E8M0 exponent per 32 elements of head_dim: about
half the bytes of fp16).

The lengths are advanced in place on the device (``seqlens.add_``), never rebuilt from the
host, so a step costs no host-to-device copy and no sync, and the device work of a step
compiles (``torch.compile(fullgraph=True)``, CUDA graphs). A host mirror of the lengths
(``lengths``) serves the checks and the error messages only; the page pool is host
bookkeeping (a page is reserved when a step needs it).

A forward step over T new tokens::

    cache.prepare(T)                   # host: checks, reserves pages
    pos = cache.positions(T)           # [batch, T] positions (for RoPE), on the device
    for layer ...:
        cache.append(layer, k, v)      # k, v: [batch, T, kv_heads, head_dim]
        out = cache.attend(layer, q)   # q: [batch, T, heads, head_dim]
    cache.commit()                     # lengths += T (device, in place; and the mirror)

``rollback(lengths)`` truncates sequences (speculative decoding rejected tokens; pages
past the new end go back to the pool), ``reset()`` empties the cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from llmcore.formats import get_format
from llmcore.ops._dispatch import kernel_supported
from llmcore.ops.bfp import BFPTensor
from llmcore.ops.decode import decode_attention, kv_cache_append
from llmcore.ops.memory import hugepage_zeros, wants_hugepages

STORAGES = ("native", "mxint8", "float32", "bfloat16", "float16")
_FLOAT_STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCache(nn.Module):
    """Keys and values of ``n_layers`` layers for ``batch_size`` sequences.

    Parameters
    ----------
    n_layers, batch_size, max_seq_len, n_kv_heads, head_dim : int
    dtype : torch.dtype
        Dtype of the new tokens (and of the storage when ``storage="native"``).
    device : str or torch.device
    storage : {"native", "mxint8", "float32", "bfloat16", "float16"}
        "native" stores ``dtype``; a float dtype's name stores that dtype whatever
        ``dtype`` is (an fp32 model with a 16-bit cache: half the bytes read per decode
        step; k and v are rounded to it as they are written); "mxint8" stores int8
        mantissas with one exponent per 32 elements.
    page_size : int, optional
        Enables paging: memory is allocated in pages of ``page_size`` positions, taken
        from a pool of ``num_pages`` (default: enough for every sequence at
        ``max_seq_len``) as sequences grow, and returned on rollback/reset.
    num_pages : int, optional
    hugepages : bool or "auto"
        On the CPU, keys, values (and exponents) in one arena of 2 MB pages
        (:func:`llmcore.ops.memory.hugepage_zeros`; True needs the compiled extension): a
        decode step reads the whole cache of each layer, head by head, which on 4 KB pages
        costs a TLB miss per page. "auto" (``Transformer.new_cache``'s default) does where
        the system gives such pages and the cache holds 2 MB or more
        (:func:`llmcore.ops.memory.wants_hugepages`).

    Buffers (not saved in ``state_dict``): ``k_values`` / ``v_values`` (the float values,
    or the int8 mantissas of MXINT8 storage), ``k_exponents`` / ``v_exponents`` (MXINT8
    only, else None), ``seqlens`` (int32 [batch], committed lengths) and ``block_table``
    (int32 [batch, max_pages] with paging, else None).
    """

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 storage: str = "native", page_size: int | None = None,
                 num_pages: int | None = None, hugepages: bool | str = False):
        super().__init__()
        for name, val in (("n_layers", n_layers), ("batch_size", batch_size),
                          ("max_seq_len", max_seq_len), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.n_layers, self.batch_size, self.max_seq_len = n_layers, batch_size, max_seq_len
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.storage, self.page_size = storage, page_size
        device = torch.device(device)
        self._lengths = [0] * batch_size  # host mirror of seqlens: checks and messages only
        self._pending = 0
        self._kernels: dict = {}  # dtype -> whether append_attend's CPU kernels take it
        block_table = None
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
            block_table = torch.zeros(batch_size, self.max_pages, dtype=torch.int32,
                                      device=device)
        elif num_pages is not None:
            raise ValueError("num_pages needs page_size")
        else:
            lead = (n_layers, batch_size, max_seq_len)
        shape = (*lead, n_kv_heads, head_dim)
        mx = storage == "mxint8"
        vdtype = torch.int8 if mx else _FLOAT_STORAGES.get(storage, dtype)
        eshape = (*lead, n_kv_heads, get_format("mxint8").exponent_cols(head_dim))
        specs = [(shape, vdtype), (shape, vdtype)] + ([(eshape, torch.uint8)] * 2 if mx else [])
        nbytes = sum(math.prod(sh) * dt.itemsize for sh, dt in specs)
        if wants_hugepages(hugepages, device, nbytes):  # zeros in one arena of 2 MB pages
            buffers = hugepage_zeros(specs)
        else:
            buffers = [torch.zeros(sh, dtype=dt, device=device) for sh, dt in specs]
        for i, kv in enumerate(("k", "v")):
            self.register_buffer(f"{kv}_values", buffers[i], persistent=False)
            self.register_buffer(f"{kv}_exponents", buffers[2 + i] if mx else None,
                                 persistent=False)
        self.register_buffer("block_table", block_table, persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch_size, dtype=torch.int32,
                                                    device=device), persistent=False)
        self._bind()

    def _bind(self) -> None:
        """Plain references to the buffers and per-layer views of K/V (BFPTensors for
        MXINT8) for the per-token path: no nn.Module attribute lookup and no BFPTensor
        construction per layer per step. Rebound whenever the buffers move (``_apply``)."""
        self._seq, self._table = self.seqlens, self.block_table
        kv = [(self.k_values, self.k_exponents), (self.v_values, self.v_exponents)]
        if self.storage == "mxint8":
            self._views = [tuple(BFPTensor(m[i], e[i], "mxint8", tuple(m[i].shape), self.dtype)
                                 for m, e in kv) for i in range(self.n_layers)]
        else:
            self._views = [(self.k_values[i], self.v_values[i]) for i in range(self.n_layers)]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._bind()
        return out

    @property
    def device(self) -> torch.device:
        return self._seq.device

    def layer_kv(self, layer: int):
        """``layer``'s K and V storage, fresh views [batch, max_seq, kv_heads, head_dim] (or
        the paged form); BFPTensors for MXINT8 storage."""
        if self.storage == "mxint8":
            return self._views[layer]
        return self.k_values[layer], self.v_values[layer]

    @property
    def k(self):
        """All layers' keys: a tensor, or (mantissas, exponents) for MXINT8 storage."""
        return self.k_values if self.k_exponents is None else (self.k_values, self.k_exponents)

    @property
    def v(self):
        """All layers' values: a tensor, or (mantissas, exponents) for MXINT8 storage."""
        return self.v_values if self.v_exponents is None else (self.v_values, self.v_exponents)

    @property
    def lengths(self) -> list[int]:
        """Committed length of each sequence (the host mirror of ``seqlens``)."""
        return list(self._lengths)

    @property
    def end(self) -> int:
        """One past the last position in use, host-side: during a step (after
        :meth:`prepare`) that of its new tokens, else the longest sequence's length."""
        return max(self._lengths) + self._pending

    def nbytes(self) -> int:
        parts = (self.k_values, self.v_values, self.k_exponents, self.v_exponents)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    # -- a step: host checks ------------------------------------------------------------
    def prepare(self, num_new: int, prefill: bool = False, want_positions: bool = True
                ) -> torch.Tensor | None:
        """Check and reserve room for ``num_new`` tokens per sequence (``prefill``: the
        cache must be empty); returns their positions, as :meth:`positions` (None with
        ``want_positions=False``: a caller that computes them later skips the ops)."""
        if not isinstance(num_new, int) or num_new < 1:
            raise ValueError(f"num_new must be a positive int, got {num_new!r}")
        if self._pending:
            raise RuntimeError("prepare() called twice without commit()")
        if prefill and any(self._lengths):
            raise ValueError(f"a prefill step needs an empty cache, got lengths {self._lengths} "
                             "(use prefill=False to attend to the cached tokens)")
        longest = max(self._lengths) + num_new
        if longest > self.max_seq_len:
            raise ValueError(f"{num_new} new tokens would make a sequence {longest} long, past "
                             f"max_seq_len={self.max_seq_len}")
        if self.page_size is not None:
            self._reserve_pages(num_new)
        self._pending = num_new
        return self.positions(num_new) if want_positions else None

    def _reserve_pages(self, num_new: int) -> None:
        need = [-(-(n + num_new) // self.page_size) - len(p)
                for n, p in zip(self._lengths, self._pages, strict=True)]
        if sum(need) > len(self._free):
            raise RuntimeError(f"KV cache out of pages: need {sum(need)} more, "
                               f"{len(self._free)} free of {self.num_pages}")
        rows, cols, pages = [], [], []
        for b, n in enumerate(need):
            for _ in range(n):
                rows.append(b)
                cols.append(len(self._pages[b]))
                pages.append(self._free.pop())
                self._pages[b].append(pages[-1])
        if pages:  # one host-to-device copy for all new pages
            self._table[rows, cols] = torch.tensor(pages, dtype=torch.int32).to(
                self._table.device, non_blocking=True)

    def _check_step(self, what: str, layer: int | None = None) -> None:
        if not self._pending:
            raise RuntimeError(f"{what}() needs prepare(num_new) first")
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)
                                  or not 0 <= layer < self.n_layers):
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")

    # -- a step: device work (no host sync; compiles) ---------------------------------
    def positions(self, num_new: int) -> torch.Tensor:
        """Positions of the next ``num_new`` tokens of each sequence: int64 [batch,
        num_new] on the device (``seqlens[b] + 0 .. num_new - 1``)."""
        if self._seq.device.type == "cpu" and not torch.compiler.is_compiling():
            # the host lengths mirror seqlens: one small tensor instead of four ops
            return torch.tensor([[n + i for i in range(num_new)] for n in self._lengths])
        start = self._seq.to(torch.int64).unsqueeze(1)
        return start + torch.arange(num_new, device=self._seq.device).unsqueeze(0)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's k, v [batch, num_new, kv_heads, head_dim] for ``layer``."""
        self._check_step("append", layer)
        want = (self.batch_size, self._pending, self.n_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must have shape {list(want)}, got {list(k.shape)} and "
                             f"{list(v.shape)}")
        kc, vc = self._views[layer]
        kv_cache_append(kc, vc, k.to(self.dtype), v.to(self.dtype), self._seq, self._table,
                        validate=False)

    def attend(self, layer: int, q: torch.Tensor, softmax_scale: float | None = None
               ) -> torch.Tensor:
        """decode_attention of q [batch, num_new, heads, head_dim] over ``layer``'s cache
        (committed tokens + this step's)."""
        self._check_step("attend", layer)
        if q.shape[1] != self._pending:
            raise ValueError(f"q must have {self._pending} new tokens, got shape {list(q.shape)}")
        kc, vc = self._views[layer]
        return decode_attention(q.to(self.dtype), kc, vc, self._seq + q.shape[1],
                                softmax_scale, self._table, validate=False)

    def append_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                      ) -> torch.Tensor:
        """:meth:`append` of k, v then :meth:`attend` of q, for inference: on the CPU, with
        the cache's dtype and the shapes this step prepared, the two kernels are called
        directly (the C++ ops check their arguments: nothing is re-checked in Python);
        anything else goes through append and attend."""
        kc, vc = self._views[layer] if self._pending and 0 <= layer < self.n_layers else (
            None, None)
        want = (self.batch_size, self._pending, self.n_kv_heads, self.head_dim)
        if (kc is None or q.device.type != "cpu" or not self._cpu_kernels(q.dtype)
                or k.shape != want or v.shape != want or q.shape[1] != self._pending
                or q.dtype != self.dtype or k.dtype != self.dtype or v.dtype != self.dtype):
            self.append(layer, k, v)
            return self.attend(layer, q)
        if self.storage == "mxint8":
            (km, ke), (vm, ve) = (kc.mantissa, kc.exponent), (vc.mantissa, vc.exponent)
        else:
            km, ke, vm, ve = kc, None, vc, None
        torch.ops.llmcore.kv_cache_append(km, vm, k, v, self._seq, self._table, ke, ve)
        scale = 1.0 / math.sqrt(self.head_dim)
        return torch.ops.llmcore.decode_attention(q, km, vm, self._seq + q.shape[1], scale,
                                                  self._table, ke, ve)[0]

    def _cpu_kernels(self, dtype: torch.dtype) -> bool:
        compiling = torch.compiler.is_compiling()  # traced as a constant: no dict guard
        ok = None if compiling else self._kernels.get(dtype)
        if ok is None:
            cpu = torch.device("cpu")
            ok = (kernel_supported("kv_cache_append", cpu, dtype)
                  and kernel_supported("decode_attention", cpu, dtype, self.head_dim))
            if not compiling:
                self._kernels[dtype] = ok
        return ok

    def commit(self, num_new: int | None = None) -> None:
        """Make this step's tokens part of every sequence: all of them, or the first
        ``num_new`` (0 <= num_new <= the prepared count; the rest are dropped and their
        pages return to the pool)."""
        if not self._pending:
            raise RuntimeError("commit() without prepare()")
        n = self._pending if num_new is None else num_new
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._pending:
            raise ValueError(f"num_new must be an int in [0, {self._pending}] (the prepared "
                             f"tokens), got {num_new!r}")
        short = n < self._pending
        self._pending = 0
        if n:
            self._seq.add_(n)
            self._lengths = [x + n for x in self._lengths]
        if short:
            self.rollback(self._lengths)  # pages reserved past the new ends

    def cancel(self) -> None:
        """Drop a prepared step that will not be committed (its pages return to the pool)."""
        self._pending = 0
        self.rollback(self._lengths)

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
        lengths = [int(x) for x in lengths]
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
        if lengths != self._lengths:
            self._seq.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=True)
            self._lengths = lengths

    def reset(self) -> None:
        """Empty every sequence (buffers are kept; pages return to the pool)."""
        self._pending = 0
        self.rollback([0] * self.batch_size)

    def extra_repr(self) -> str:
        paging = f", page_size={self.page_size}, num_pages={self.num_pages}" if self.page_size else ""
        return (f"layers={self.n_layers}, batch={self.batch_size}, "
                f"max_seq_len={self.max_seq_len}, kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, storage={self.storage}, dtype={self.dtype}{paging}, "
                f"lengths={self._lengths}")
