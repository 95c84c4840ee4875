"""Block-floating-point ops: quantise, dequantise, BFP linear layers (docs/bfp.md).

``bfp_quantize`` turns a float tensor into a :class:`BFPTensor` (int mantissas plus one
shared E8M0 exponent per block along the last axis); ``bfp_linear`` multiplies by a BFP
weight either weight-only (activations stay float: the memory-bound decode path) or with
the activations quantised too (integer mantissa products, exact per block).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from llmcore import _ext
from llmcore._io import check_regular_file
from llmcore.formats import BFPFormat, check_rounding, get_format
from llmcore.ops._dispatch import kernel_or_reference, kernel_supported

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# BFPTensor
# ---------------------------------------------------------------------------------------
class BFPTensor:
    """A tensor stored in a block-floating-point format.

    Attributes
    ----------
    mantissa : Tensor
        int8 ``[..., K]``; for formats of <= 4 mantissa bits uint8 ``[..., ceil(K/2)]``,
        two elements per byte (element 2i in the low nibble, two's complement).
    exponent : Tensor
        uint8 ``[..., ceil(K / block_size)]``: the shared exponent of each block, biased by
        127 (E8M0); 255 marks a block that held Inf/NaN and dequantises to NaN.
    format : BFPFormat
    shape : torch.Size
        The logical shape ``[..., K]``.
    dtype : torch.dtype
        The dtype :meth:`dequantize` returns by default (the dtype it was quantised from).
    """

    __slots__ = ("mantissa", "exponent", "format", "shape", "dtype")

    def __init__(self, mantissa: torch.Tensor, exponent: torch.Tensor, format: BFPFormat | str,
                 shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32):
        fmt = get_format(format)
        shape = torch.Size(shape)
        if len(shape) == 0:
            raise ValueError("BFPTensor needs at least one dimension")
        k = shape[-1]
        want_m = (*shape[:-1], fmt.mantissa_cols(k))
        want_e = (*shape[:-1], fmt.exponent_cols(k))
        want_mdt = torch.uint8 if fmt.packed else torch.int8
        if mantissa.dtype != want_mdt or tuple(mantissa.shape) != want_m:
            raise ValueError(f"mantissa must be {want_mdt} of shape {list(want_m)} for {fmt.name} "
                             f"shape {list(shape)}, got {mantissa.dtype} {list(mantissa.shape)}")
        if exponent.dtype != torch.uint8 or tuple(exponent.shape) != want_e:
            raise ValueError(f"exponent must be torch.uint8 of shape {list(want_e)}, got "
                             f"{exponent.dtype} {list(exponent.shape)}")
        if mantissa.device != exponent.device:
            raise ValueError(f"mantissa and exponent must be on one device, got "
                             f"{mantissa.device} and {exponent.device}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        self.mantissa, self.exponent, self.format = mantissa, exponent, fmt
        self.shape, self.dtype = shape, dtype

    @property
    def device(self) -> torch.device:
        return self.mantissa.device

    def dim(self) -> int:
        return len(self.shape)

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def nbytes(self) -> int:
        """Bytes of storage: mantissas plus exponents."""
        return self.mantissa.numel() * self.mantissa.element_size() + self.exponent.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Values as a float tensor of ``dtype`` (default: :attr:`dtype`)."""
        return bfp_dequantize(self, self.dtype if dtype is None else dtype)

    def to(self, device) -> BFPTensor:
        return BFPTensor(self.mantissa.to(device), self.exponent.to(device), self.format,
                         self.shape, self.dtype)

    def contiguous(self) -> BFPTensor:
        return BFPTensor(self.mantissa.contiguous(), self.exponent.contiguous(), self.format,
                         self.shape, self.dtype)

    def __repr__(self) -> str:
        return (f"BFPTensor(format={self.format.name}, shape={list(self.shape)}, "
                f"dtype={self.dtype}, device={self.device})")

    # -- serialisation ------------------------------------------------------------------
    def metadata(self) -> dict:
        f = self.format
        return {"format": f.name, "mantissa_bits": f.mantissa_bits, "block_size": f.block_size,
                "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_parts(cls, mantissa: torch.Tensor, exponent: torch.Tensor, meta: dict) -> BFPTensor:
        fmt = BFPFormat(meta["format"], int(meta["mantissa_bits"]), int(meta["block_size"]))
        dtype = getattr(torch, meta["dtype"])
        return cls(mantissa, exponent, fmt, tuple(meta["shape"]), dtype)


_BFP_META_KEY = "llmcore.bfp"


def save_bfp(tensors: dict[str, torch.Tensor | BFPTensor], path: str | os.PathLike,
             metadata: dict[str, str] | None = None) -> None:
    """Save plain and BFP tensors to one safetensors file, atomically.

    A BFPTensor ``name`` is stored as ``name.mantissa`` and ``name.exponent`` with its
    format in the file's metadata; :func:`load_bfp` restores it exactly. The file is
    written beside ``path`` and renamed over it, so an interrupted save never leaves a
    truncated file behind.
    """
    from safetensors.torch import save_file

    flat: dict[str, torch.Tensor] = {}
    bfp_meta: dict[str, dict] = {}
    for name, t in tensors.items():
        if isinstance(t, BFPTensor):
            for part in (f"{name}.mantissa", f"{name}.exponent"):
                if part in tensors:
                    raise ValueError(f"tensors[{part!r}] clashes with the storage of BFPTensor "
                                     f"{name!r}; rename one of them")
            flat[f"{name}.mantissa"] = t.mantissa.contiguous().cpu()
            flat[f"{name}.exponent"] = t.exponent.contiguous().cpu()
            bfp_meta[name] = t.metadata()
        elif isinstance(t, torch.Tensor):
            flat[name] = t.contiguous().cpu()
        else:
            raise TypeError(f"tensors[{name!r}] must be a Tensor or BFPTensor, got {type(t)}")
    meta = dict(metadata or {})
    meta[_BFP_META_KEY] = json.dumps(bfp_meta)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _not_safetensors(path: Path, error: Exception) -> ValueError:
    """The error for a file safetensors cannot open: names the file, its folder and the
    likely problem."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        why = "the file is empty"
    elif head[:1] == b"\x80" or head[:2] == b"PK":
        why = "it looks like a pickle / torch.save file, which llmcore never loads"
    elif size < 8:
        why = "truncated?"
    else:
        n = int.from_bytes(head, "little")
        why = (f"its header claims {n} bytes but the file has {size - 8} after the length "
               "field: truncated?" if n > size - 8 else f"{error}")
    return ValueError(f"{path.name} in {path.parent} is not a valid safetensors file ({why})")


def _open_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(safe_open handle, checked path, "name in folder") of a safetensors file; a file
    safetensors cannot open raises ValueError naming it and the likely problem."""
    from safetensors import safe_open

    path = check_regular_file(path, "safetensors file")
    try:
        handle = safe_open(os.fspath(path), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise _not_safetensors(path, e) from None
    return handle, path, f"{path.name} in {path.parent}"


def _bfp_metadata(f, where: str) -> dict[str, dict]:
    """The BFP entries of an open file's metadata: {name: format metadata}, each checked
    to have its mantissa and exponent tensors."""
    raw = (f.metadata() or {}).get(_BFP_META_KEY, "{}")
    try:
        bfp_meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: metadata {_BFP_META_KEY!r} is not valid JSON ({e})"
                         ) from None
    if not isinstance(bfp_meta, dict) or not all(isinstance(m, dict)
                                                  for m in bfp_meta.values()):
        raise ValueError(f"{where}: metadata {_BFP_META_KEY!r} must map tensor names to "
                         f"objects, got {raw[:200]!r}")
    keys = set(f.keys())
    for name in bfp_meta:
        parts = (f"{name}.mantissa", f"{name}.exponent")
        if not set(parts) <= keys:
            raise ValueError(f"{where}: BFP tensor {name!r} in the metadata has no "
                             f"{' / '.join(p for p in parts if p not in keys)} tensor")
    return bfp_meta


def _bfp_from_parts(mantissa, exponent, meta: dict, name: str, where: str) -> BFPTensor:
    try:
        return BFPTensor.from_parts(mantissa, exponent, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: bad metadata for BFP tensor {name!r} ({meta}): "
                         f"{type(e).__name__}: {e}") from None


def load_bfp(path: str | os.PathLike, device: str | torch.device = "cpu"
             ) -> dict[str, torch.Tensor | BFPTensor]:
    """Load a file written by :func:`save_bfp` (or any safetensors file).

    A path that is not a regular file, a file safetensors cannot read, or BFP metadata
    that does not describe the file's tensors raises ValueError naming the file and the
    problem (FileNotFoundError for a missing file)."""
    handle, path, where = _open_safetensors(path, device)
    out: dict[str, torch.Tensor | BFPTensor] = {}
    with handle as f:
        bfp_meta = _bfp_metadata(f, where)
        keys = set(f.keys())
        for name, meta in bfp_meta.items():
            parts = (f"{name}.mantissa", f"{name}.exponent")
            out[name] = _bfp_from_parts(f.get_tensor(parts[0]), f.get_tensor(parts[1]), meta,
                                        name, where)
            keys -= set(parts)
        for k in sorted(keys):
            out[k] = f.get_tensor(k)
    return out


# safetensors dtype names -> torch dtypes (others are described by reading the tensor)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def index_bfp(path: str | os.PathLike) -> dict[str, torch.Tensor | BFPTensor]:
    """What :func:`load_bfp` would return, as placeholders on the ``meta`` device (names,
    shapes, dtypes, BFP formats) built from the file's header alone: no tensor data is
    read. Raises the errors :func:`load_bfp` raises for a malformed file or metadata."""
    handle, path, where = _open_safetensors(path)
    with handle as f:
        bfp_meta = _bfp_metadata(f, where)

        def meta(k: str) -> torch.Tensor:
            sl = f.get_slice(k)
            dt = _ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                return torch.empty_like(f.get_tensor(k), device="meta")
            return torch.empty(sl.get_shape(), dtype=dt, device="meta")

        keys = set(f.keys())
        out: dict[str, torch.Tensor | BFPTensor] = {}
        for name, m in bfp_meta.items():
            parts = (f"{name}.mantissa", f"{name}.exponent")
            out[name] = _bfp_from_parts(meta(parts[0]), meta(parts[1]), m, name, where)
            keys -= set(parts)
        for k in sorted(keys):
            out[k] = meta(k)
    return out


def read_bfp_tensor(path: str | os.PathLike, name: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.Tensor | BFPTensor:
    """One tensor (plain or BFP) of a file :func:`index_bfp` described, read into memory
    of its own on ``device`` (a plain tensor converted to ``dtype`` if given, in the same
    copy). The file is opened for this tensor alone, so the pages of it mapped for
    reading are released on return: reading a checkpoint tensor by tensor holds at most
    one tensor of the file at a time."""
    handle, path, where = _open_safetensors(path)
    with handle as f:
        meta = _bfp_metadata(f, where).get(name)
        if meta is None:
            return f.get_tensor(name).to(device, dtype, copy=True)
        m = f.get_tensor(f"{name}.mantissa").to(device, copy=True)
        e = f.get_tensor(f"{name}.exponent").to(device, copy=True)
    return _bfp_from_parts(m, e, meta, name, where)


# ---------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# The GEMV tile layout (docs/bfp.md): a CPU inference layout of BFP weights
# ---------------------------------------------------------------------------------------
def tiles_supported(shape, fmt: BFPFormat) -> bool:
    """Whether a BFP weight of ``shape`` [N, K] in ``fmt`` can take the tile layout: blocks
    of 32, N a multiple of 16 and K of 32."""
    return (len(shape) == 2 and fmt.block_size == 32 and shape[0] % 16 == 0 and shape[0] > 0
            and shape[1] % 32 == 0 and shape[1] > 0)


def _tile_view(fmt: BFPFormat, k: int) -> tuple[int, int]:
    """(blocks along K, 4-byte groups per block) of the tile layout."""
    return k // 32, (4 if fmt.packed else 8)


def tile_layout(mantissa: torch.Tensor, exponent: torch.Tensor, fmt: BFPFormat, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile layout of a plain BFP weight (mantissa [N, K or K/2], exponent [N, K/32]):
    ``([N/16, K/32, 16 * block bytes], [N/16, K/32, 16])``, the same bytes reordered so that
    one 64-byte vector holds a 4-byte group of 16 rows (csrc/bfp/bfp_cpu.h). A permutation
    in torch: any device; the CPU kernels read it directly."""
    n = mantissa.shape[0]
    nb, groups = _tile_view(fmt, k)
    tm = (mantissa.reshape(n // 16, 16, nb, groups, 4).permute(0, 2, 3, 1, 4)
          .reshape(n // 16, nb, groups * 64).contiguous())
    te = exponent.reshape(n // 16, 16, nb).permute(0, 2, 1).contiguous()
    return tm, te


def plain_layout(tiles: torch.Tensor, tile_exponent: torch.Tensor, fmt: BFPFormat, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain layout of a weight in the tile layout (inverse of :func:`tile_layout`)."""
    t = tiles.shape[0]
    nb, groups = _tile_view(fmt, k)
    m = (tiles.reshape(t, nb, groups, 16, 4).permute(0, 3, 1, 2, 4)
         .reshape(16 * t, nb * groups * 4).contiguous())
    e = tile_exponent.permute(0, 2, 1).reshape(16 * t, nb).contiguous()
    return m, e


def tile_rows(tiles: torch.Tensor, tile_exponent: torch.Tensor, fmt: BFPFormat, k: int,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` (int64 [R]) of a weight in the tile layout, in the plain layout:
    mantissa [R, K or K/2], exponent [R, K/32] (an embedding lookup from a tied head)."""
    t = tiles.shape[0]
    nb, groups = _tile_view(fmt, k)
    tile, lane = rows // 16, rows % 16
    m = tiles.reshape(t, nb, groups, 16, 4)[tile, :, :, lane, :]  # [R, nb, groups, 4]
    e = tile_exponent[tile, :, lane]  # [R, nb]
    return m.reshape(rows.numel(), nb * groups * 4), e


def tiles_fast() -> bool:
    """Whether the CPU kernels read the tile layout directly here (AVX-512 VNNI, and
    ``LLMCORE_CPU_ISA`` not lowering the ISA). Elsewhere a tiled weight still works: the
    kernels unpack it per 16 rows, which costs more than the plain layout."""
    global _TILES_FAST
    if _TILES_FAST is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = set(f.read().split())
        except OSError:
            flags = set()
        _TILES_FAST = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    isa = os.environ.get("LLMCORE_CPU_ISA", "")
    return _TILES_FAST and isa in ("", "avx512", "amx")


_TILES_FAST: bool | None = None


def _check_float(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def bfp_quantize(x: torch.Tensor, format: str | BFPFormat = "mxint8",
                 rounding: str = "nearest") -> BFPTensor:
    """Quantise ``x`` to a block-floating-point format along its last axis.

    Parameters
    ----------
    x : Tensor [..., K]
        float32, bfloat16 or float16, any strides, K >= 1. Blocks containing Inf or NaN
        dequantise to NaN.
    format : str or BFPFormat
        A preset name (mxint8, mxint4, msfp16, msfp12, bfp16) or a BFPFormat.
    rounding : {"nearest", "even"}
        Mantissa rounding: half away from zero (default) or half to even.

    Returns
    -------
    BFPTensor of logical shape ``x.shape`` that dequantises to ``x.dtype`` by default.
    """
    _check_float("x", x)
    fmt = get_format(format)
    even = check_rounding(rounding)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis to quantise, got shape {list(x.shape)}")
    fn = kernel_or_reference("bfp_quantize", x.device, x.dtype)
    m, e = fn(x, fmt.mantissa_bits, fmt.block_size, even)
    return BFPTensor(m, e, fmt, x.shape, x.dtype)


def bfp_dequantize(q: BFPTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise a :class:`BFPTensor` to a float tensor ``q.shape`` of ``dtype``."""
    if not isinstance(q, BFPTensor):
        raise TypeError(f"q must be a BFPTensor, got {type(q).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    f = q.format
    fn = kernel_or_reference("bfp_dequantize", q.device)
    return fn(q.mantissa, q.exponent, f.mantissa_bits, f.block_size, q.shape[-1], dtype)


def _check_linear_args(x: torch.Tensor, weight: BFPTensor, bias: torch.Tensor | None) -> None:
    _check_float("x", x)
    if not isinstance(weight, BFPTensor):
        raise TypeError(f"weight must be a BFPTensor (see bfp_quantize), got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] = {weight.shape[1]} (K), got "
                         f"x of shape {list(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape [{weight.shape[0]}], got "
                             f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias)}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on {x.device}, got {bias.device}")


def bfp_linear(x: torch.Tensor, weight: BFPTensor, bias: torch.Tensor | None = None,
               act_format: str | BFPFormat | None = None, rounding: str = "nearest"
               ) -> torch.Tensor:
    """``y = x @ weight^T (+ bias)`` with a BFP weight.

    Parameters
    ----------
    x : Tensor [..., K]
        float32, bfloat16 or float16.
    weight : BFPTensor [N, K]
    bias : Tensor [N], optional
        Cast to x's dtype (weight-only) or added in fp32 (activation-quantised).
    act_format : str or BFPFormat, optional
        None: weight-only, x stays float and the product accumulates in fp32 (the
        memory-bound decode path). A format: x is quantised per block along K on the fly
        and the mantissas are multiplied in integers, each block product exact in int32,
        scaled by 2^(ea+eb) and accumulated in fp32. If its block size differs from the
        weight's, both operands are dequantised and multiplied in fp32 instead.
    rounding : {"nearest", "even"}
        Rounding used to quantise x (activation-quantised path only).

    Returns
    -------
    Tensor [..., N] of x's dtype. Differentiable with respect to x and bias (the weight is
    frozen here; see :class:`llmcore.nn.BFPLinear` for training).
    """
    _check_linear_args(x, weight, bias)
    even = check_rounding(rounding)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    if act_format is None:  # the op's registered autograd gives grad x and grad bias
        return _weight_only_linear(x2, weight, bias).reshape(*lead, n)
    af = get_format(act_format)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _BFPLinearFunction.apply(x2, bias, None, weight, None, af, even, None)
    else:
        y = _act_quant_linear(x2, bias, weight, af, even)
    return y.reshape(*lead, n)


def bfp_linear_trainable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         format: str | BFPFormat, act_format: str | BFPFormat | None = None,
                         grad_format: str | BFPFormat | None = None) -> torch.Tensor:
    """``y = x @ Q(weight)^T (+ bias)`` with a float master weight, differentiable with
    respect to x, weight and bias (what :class:`llmcore.nn.BFPLinear` trains with).

    Parameters
    ----------
    x : Tensor [..., K]
    weight : Tensor [N, K]
        The master weight, quantised to ``format`` on every call (after a cast to x's dtype
        when ``act_format`` is None).
    bias : Tensor [N], optional
    format, act_format : as :func:`bfp_linear` (``format`` is the weight's).
    grad_format : str or BFPFormat, optional
        None: both backward GEMMs in full precision. A format: each backward GEMM quantises
        its operands along its own reduction axis (the MX training recipe).

    Returns
    -------
    Tensor [..., N] of x's dtype. Gradients pass straight through the rounding of x and of
    the weight (see :class:`_BFPLinearFunction`).
    """
    fmt = get_format(format)
    af = None if act_format is None else get_format(act_format)
    gf = None if grad_format is None else get_format(grad_format)
    y = _BFPLinearFunction.apply(x.reshape(-1, x.shape[-1]), bias, weight, None, fmt, af,
                                 False, gf)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _weight_only_linear(x2: torch.Tensor, weight: BFPTensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """x2 @ dequant(weight)^T (+ bias cast to x2's dtype), fp32 accumulation."""
    f = weight.format
    b = None if bias is None else bias.to(x2.dtype)
    fn = kernel_or_reference("bfp_linear", x2.device, x2.dtype)
    return fn(x2, weight.mantissa, weight.exponent, f.mantissa_bits, f.block_size, b)


def _act_quant_linear(x2: torch.Tensor, bias: torch.Tensor | None, weight: BFPTensor,
                      af: BFPFormat, even: bool) -> torch.Tensor:
    """Q(x2) @ weight^T (+ bias) with x2 quantised to ``af`` along K. On the CPU, up to 16
    rows of 8-bit activations in blocks of 32 take the int8-activation GEMV (the weight
    streams once in its storage layout); more rows, the packed VNNI GEMM."""
    f = weight.format
    b = None if bias is None else bias.float()
    if af.block_size != f.block_size:
        q = bfp_quantize(x2, af, "even" if even else "nearest")
        y = q.dequantize(torch.float32) @ weight.dequantize(torch.float32).T
        y = y if b is None else y + b
        return y.to(x2.dtype)
    if kernel_supported("bfp_act_linear", x2.device, x2.dtype):  # one call, no temporaries
        return torch.ops.llmcore.bfp_act_linear(x2, weight.mantissa, weight.exponent,
                                                af.mantissa_bits, f.mantissa_bits,
                                                f.block_size, even, b)
    # The ops directly (no BFPTensor in between): this runs once per layer per token.
    qm, qe = kernel_or_reference("bfp_quantize", x2.device, x2.dtype)(
        x2, af.mantissa_bits, af.block_size, even)
    fn = kernel_or_reference("bfp_gemm", x2.device)
    return fn(qm, qe, weight.mantissa, weight.exponent, af.mantissa_bits, f.mantissa_bits,
              f.block_size, x2.shape[-1], b, x2.dtype)


def bfp_act_linears(x: torch.Tensor, weights: list[BFPTensor],
                    biases: list[torch.Tensor | None], act_format: str | BFPFormat,
                    rounding: str = "nearest") -> list[torch.Tensor] | None:
    """``[bfp_linear(x, w, b, act_format) for w, b in zip(weights, biases)]`` with x
    quantised once (the projections that share an input: q/k/v, gate/up), or None when no
    kernel takes the call (another device, weights of different formats, a block size
    other than the activation format's): the caller then runs the layers one by one.
    Inference only (no autograd).

    Parameters
    ----------
    x : Tensor [..., K]
    weights : list of BFPTensor [N_i, K], one format
    biases : list of Tensor [N_i] or None
    act_format, rounding : as :func:`bfp_linear`

    Returns
    -------
    list of Tensor [..., N_i] of x's dtype, or None.
    """
    af = get_format(act_format)
    f = weights[0].format
    if (not kernel_supported("bfp_act_linear_multi", x.device, x.dtype)
            or af.block_size != f.block_size or any(w.format != f for w in weights)):
        return None
    return torch.ops.llmcore.bfp_act_linear_multi(
        x, [w.mantissa for w in weights], [w.exponent for w in weights], af.mantissa_bits,
        f.mantissa_bits, f.block_size, check_rounding(rounding), list(biases))


def _quantized_mm(a: torch.Tensor, b: torch.Tensor, fmt: BFPFormat) -> torch.Tensor:
    """a [M, R] @ b [P, R]^T in fp32 with both operands quantised along R."""
    return _act_quant_linear(a, None, bfp_quantize(b, fmt), fmt, False)


def _straight_through_grads(grad_y: torch.Tensor, x2: torch.Tensor | None, w: torch.Tensor,
                            grad_fmt: BFPFormat | None, need_x: bool, need_w: bool,
                            need_b: bool):
    """Gradients of ``y = x2 @ w^T + b`` in fp32 with the rounding of x2 and w taken as
    the identity (straight-through, as in quantisation-aware training):
    grad_x = dY @ W, grad_w = dY^T @ X, grad_b = sum of dY over rows. With ``grad_fmt``
    each product quantises its operands along its reduction axis: grad_x = Q(dY) Q(W^T)
    (over N), grad_w = Q(dY^T) Q(X^T) (over the rows). grad_y [T, N], x2 [T, K], w [N, K]
    fp32. Returns (grad_x, grad_w, grad_b), None where not needed."""
    gy = grad_y.float()
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = gy @ w if grad_fmt is None else _quantized_mm(gy, w.T.contiguous(), grad_fmt)
    if need_w:
        xf = x2.float()
        grad_w = gy.T @ xf if grad_fmt is None else _quantized_mm(
            gy.T.contiguous(), xf.T.contiguous(), grad_fmt)
    if need_b:
        grad_b = gy.sum(0)
    return grad_x, grad_w, grad_b


class _BFPLinearFunction(torch.autograd.Function):
    """The autograd of the BFP linear layers that are not the plain weight-only op (whose
    registered autograd, below, uses the same :func:`_straight_through_grads`).

    ``forward(x2 [T, K], bias [N] | None, master [N, K] | None, weight BFPTensor | None,
    fmt, af, even, grad_fmt)``: the product with the frozen BFP ``weight``, or with
    ``master`` quantised to ``fmt``; x2 quantised to ``af`` (None: weight-only). The
    backward is straight-through to x2, bias and the master weight (W is the master, or
    the dequantised frozen weight); ``grad_fmt`` None keeps it in full precision.
    """

    @staticmethod
    def forward(ctx, x2, bias, master, weight, fmt, af, even, grad_fmt):
        if weight is None:
            weight = bfp_quantize(master.to(x2.dtype) if af is None else master, fmt)
        y = (_weight_only_linear(x2, weight, bias) if af is None
             else _act_quant_linear(x2, bias, weight, af, even))
        ctx.save_for_backward(x2 if master is not None else None, master)
        ctx.weight = weight if master is None else None
        ctx.grad_fmt, ctx.x_dtype = grad_fmt, x2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, master = ctx.saved_tensors
        w = master.float() if master is not None else ctx.weight.dequantize(torch.float32)
        need_x, need_b, need_w = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = _straight_through_grads(
            grad_y, x2, w, ctx.grad_fmt, need_x, need_w and master is not None,
            need_b and ctx.bias_dtype is not None)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(master.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_b, grad_w, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# torch.library: fake (meta) impls and autograd, so the ops trace under torch.compile
# ---------------------------------------------------------------------------------------
if _ext.available():

    @torch.library.register_fake("llmcore::bfp_quantize")
    def _(x, mantissa_bits, block_size, round_even):
        k = x.shape[-1]
        packed = mantissa_bits <= 4
        m = x.new_empty((*x.shape[:-1], (k + 1) // 2 if packed else k),
                        dtype=torch.uint8 if packed else torch.int8)
        e = x.new_empty((*x.shape[:-1], -(-k // block_size)), dtype=torch.uint8)
        return m, e

    @torch.library.register_fake("llmcore::bfp_dequantize")
    def _(mantissa, exponent, mantissa_bits, block_size, k, dtype):
        return mantissa.new_empty((*mantissa.shape[:-1], k), dtype=dtype)

    @torch.library.register_fake("llmcore::bfp_linear")
    def _(x, w_mantissa, w_exponent, mantissa_bits, block_size, bias):
        return x.new_empty((x.shape[0], w_mantissa.shape[0]))

    if _ext.has_op("bfp_act_linear"):

        def _rows(m):  # output features of a plain [N, *] or tiled [N/16, *, *] weight
            return m.shape[0] * 16 if m.dim() == 3 else m.shape[0]

        @torch.library.register_fake("llmcore::bfp_act_linear")
        def _(x, w_mantissa, w_exponent, a_bits, w_bits, block_size, round_even, bias):
            return x.new_empty((*x.shape[:-1], _rows(w_mantissa)))

        @torch.library.register_fake("llmcore::bfp_act_linear_multi")
        def _(x, w_mantissa, w_exponent, a_bits, w_bits, block_size, round_even, bias):
            return [x.new_empty((*x.shape[:-1], _rows(m))) for m in w_mantissa]

    if _ext.has_op("bfp_tiles_pack"):

        @torch.library.register_fake("llmcore::bfp_tiles_pack")
        def _(mantissa, exponent, mantissa_bits, block_size):
            n, cols = mantissa.shape
            nb = exponent.shape[1]
            return (mantissa.new_empty((n // 16, nb, 16 * (cols // nb))),
                    exponent.new_empty((n // 16, nb, 16)))

        @torch.library.register_fake("llmcore::bfp_tiles_unpack")
        def _(tiles, tile_exponent, mantissa_bits, block_size):
            t, nb, b = tiles.shape
            return tiles.new_empty((16 * t, nb * b // 16)), tile_exponent.new_empty((16 * t, nb))

    if _ext.has_op("bfp_embedding"):

        @torch.library.register_fake("llmcore::bfp_embedding")
        def _(mantissa, exponent, ids, mantissa_bits, block_size, k, dtype):
            return mantissa.new_empty((*ids.shape, k), dtype=dtype)

    @torch.library.register_fake("llmcore::bfp_gemm")
    def _(a_mantissa, a_exponent, b_mantissa, b_exponent, a_bits, b_bits, block_size, k, bias,
          out_dtype):
        return a_mantissa.new_empty((a_mantissa.shape[0], b_mantissa.shape[0]), dtype=out_dtype)

    def _linear_setup(ctx, inputs, output):
        x, w_m, w_e, bits, block, bias = inputs
        ctx.save_for_backward(w_m, w_e)
        ctx.bits, ctx.block, ctx.k, ctx.has_bias = bits, block, x.shape[-1], bias is not None

    def _linear_backward(ctx, grad_y):
        w_m, w_e = ctx.saved_tensors
        w = torch.ops.llmcore.bfp_dequantize(w_m, w_e, ctx.bits, ctx.block, ctx.k,
                                             torch.float32)
        grad_x, _, grad_b = _straight_through_grads(grad_y, None, w, None, True, False,
                                                    ctx.has_bias)
        grad_b = None if grad_b is None else grad_b.to(grad_y.dtype)
        return grad_x.to(grad_y.dtype), None, None, None, None, grad_b

    torch.library.register_autograd("llmcore::bfp_linear", _linear_backward,
                                    setup_context=_linear_setup)
