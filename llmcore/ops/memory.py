"""Host memory in 2 MB pages for the tensors a CPU decode step streams (docs/memory.md).

A decode step reads every weight byte once. From ordinary 4 KB pages the hardware
prefetchers stop at every page boundary and each page costs a TLB miss; from transparent
huge pages a streaming read ran 1.5x faster on one thread of this project's AMD EPYC VM and
1.25x on two (``benchmarks/membw.cpp``). torch's CPU allocator gives huge pages only when
``THP_MEM_ALLOC_ENABLE=1`` is set before torch loads and only to allocations of 2 MB or
more, so llmcore packs a model's tensors into one arena of its own
(``torch.ops.llmcore.hugepage_arena``: an anonymous mapping aligned to 2 MB and advised
``MADV_HUGEPAGE``) with :func:`pack_hugepages`. ``Transformer.from_pretrained``,
``Transformer.quantize`` and ``Transformer.new_cache`` do so on the CPU by default.

Where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled`` is
``[never]``), off the CPU, on other systems than Linux, without the compiled extension, or
with ``LLMCORE_HUGEPAGES=0`` in the environment, :func:`hugepages_enabled` is False and the
"auto" settings leave tensors where torch put them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

import torch
from torch import nn

from llmcore import _ext

__all__ = ["HUGEPAGE", "THP_SETTING", "check_hugepages", "hugepages_enabled", "hugepage_zeros",
           "module_tensors", "pack_hugepages", "pack_tensors", "packed_bytes", "thp_mode",
           "wants_hugepages"]

THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never"
HUGEPAGE = 2 << 20  # bytes of one transparent huge page on x86-64 and arm64 (4 KB base)
_ALIGN = 64  # bytes between packed regions: a cache line, as the kernels' loads assume
_TRIM_EVERY = 16 << 20  # bytes moved between two malloc_trim calls (see pack_tensors)


def hugepages_enabled() -> bool:
    """Whether :func:`pack_hugepages` gets 2 MB pages here: Linux with transparent huge
    pages set to ``always`` or ``madvise``, the compiled extension loaded, and
    ``LLMCORE_HUGEPAGES`` not ``0``."""
    if os.environ.get("LLMCORE_HUGEPAGES", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or not _ext.has_op("hugepage_arena"):
        return False
    mode = thp_mode()
    return mode is not None and mode != "never"


def thp_mode() -> str | None:
    """The system's transparent-huge-page setting (``always``, ``madvise`` or ``never``:
    the bracketed word of :data:`THP_SETTING`), None where it cannot be read."""
    try:
        with open(THP_SETTING) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w.strip("[]") for w in words if w.startswith("[")), " ".join(words) or None)


def check_hugepages(setting) -> None:
    """Raise ValueError unless ``setting`` is a valid ``hugepages`` argument (True, False
    or ``"auto"``): callers check before they load or change anything."""
    if not (setting is True or setting is False or setting == "auto"):
        raise ValueError(f"hugepages must be True, False or 'auto', got {setting!r}")


def wants_hugepages(setting, device, nbytes: int | None = None) -> bool:
    """The decision of a ``hugepages`` argument (True, False or ``"auto"``) for ``nbytes``
    of tensors on ``device``: "auto" is :func:`hugepages_enabled` on the CPU for at least
    one huge page of data (a smaller arena would still take a whole 2 MB page of memory,
    and data that small stays in the caches anyway); True also needs the extension's op
    (it packs where THP is off too: the arena is then ordinary memory)."""
    check_hugepages(setting)
    if setting is False or torch.device(device).type != "cpu":
        return False
    if setting == "auto":
        return hugepages_enabled() and (nbytes is None or nbytes >= HUGEPAGE)
    if not _ext.has_op("hugepage_arena"):
        raise RuntimeError("hugepages=True needs llmcore's compiled extension "
                           "(torch.ops.llmcore.hugepage_arena), which is not loaded")
    return True


def _region(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def hugepage_zeros(shapes: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Zero-filled contiguous CPU tensors of the given ``(shape, dtype)`` pairs, side by side
    in one arena of 2 MB pages (each tensor its own storage; the arena is unmapped when
    the last of them is freed). Needs the compiled extension."""
    specs = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in shapes]
    sizes = [_region(t.nbytes) for t in specs]
    arena = torch.ops.llmcore.hugepage_arena(sum(sizes))
    out, off = [], 0
    for t, size in zip(specs, sizes, strict=True):
        out.append(torch.ops.llmcore.arena_view(arena, off, list(t.shape), list(t.stride()),
                                                t.dtype))
        off += size
    return out


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every distinct parameter and buffer of ``module`` (its submodules included) in
    registration order, which is the order a forward pass reads them."""
    seen, out = set(), []
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for t in table.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def _packable(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized
            and t.numel() > 0)


def pack_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """Move the data of ``tensors`` (CPU, strided; others are left alone) into one new arena
    of 2 MB pages, in place: each tensor object keeps its identity, shape, strides, dtype,
    ``requires_grad`` and values (bit for bit) and only its storage changes, so modules,
    optimisers and plans that hold the objects see the moved data. Tensors that shared a
    storage share one storage again (the part of the arena that holds the bytes they
    covered); the others each get a storage of their own.
    Each old storage is released as soon as its tensors are moved, and the heap pages
    freed are handed back every 16 MB (glibc's ``malloc_trim``), so the memory in use grows
    by about 16 MB at most while they move. Returns the bytes copied."""
    plan, total = [], 0
    for ts, lo, hi in _groups(tensors):
        plan.append((ts, lo, hi, total))
        total += _region(hi - lo)
    if not plan:
        return 0
    arena = torch.ops.llmcore.hugepage_arena(total)
    view = torch.ops.llmcore.arena_view
    freed = 0
    for ts, lo, hi, off in plan:
        src = torch.empty(0, dtype=torch.uint8).set_(ts[0].untyped_storage(), lo, (hi - lo,),
                                                     (1,))
        region = view(arena, off, [hi - lo], [1], torch.uint8)
        region.copy_(src)
        del src
        storage = region.untyped_storage()
        for t in ts:
            # made and bound in t's own mode: a normal tensor gets a normal storage even
            # when this runs under inference mode, an inference tensor stays one
            with torch.inference_mode(t.is_inference()), torch.no_grad():
                at = (t.storage_offset() * t.element_size() - lo) // t.element_size()
                t.data = torch.empty(0, dtype=t.dtype).set_(storage, at, t.shape, t.stride())
        del region, storage
        freed += hi - lo
        if freed >= _TRIM_EVERY:  # old storages from the heap go back as we go
            _trim_heap()
            freed = 0
    _trim_heap()
    return total


def pack_hugepages(module: nn.Module) -> int:
    """:func:`pack_tensors` over every parameter and buffer of ``module``, in the order the
    module registers them (the order a forward reads them: one forward stream through the
    arena). Returns the bytes copied (0 when nothing is on the CPU)."""
    return pack_tensors(module_tensors(module))


def packed_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes :func:`pack_tensors` would copy for ``tensors`` (without copying)."""
    return sum(_region(hi - lo) for _, lo, hi in _groups(tensors))


def _groups(tensors: Iterable[torch.Tensor]) -> list[tuple[list[torch.Tensor], int, int]]:
    """The packable tensors grouped by storage, each group with the byte range [lo, hi) of
    its storage that its tensors cover."""
    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        if _packable(t):
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    out = []
    for ts in groups.values():
        # lo on a 64-byte boundary of the storage: every tensor's offset from it stays a
        # multiple of its element size, and its alignment modulo 64 stays what it was
        lo = min(t.storage_offset() * t.element_size() for t in ts) // _ALIGN * _ALIGN
        hi = max((t.storage_offset() + _extent(t)) * t.element_size() for t in ts)
        out.append((ts, lo, hi))
    return out


def _extent(t: torch.Tensor) -> int:
    """Elements from the tensor's first to one past its last (numel > 0)."""
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))


def _trim_heap() -> None:
    """Return the heap pages the moved tensors freed to the system (glibc's malloc_trim:
    freed chunks below the mmap threshold otherwise stay resident)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # another C library: nothing to trim with
        pass
