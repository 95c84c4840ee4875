"""BFP linear layers and whole-model quantisation (docs/bfp.md).

:class:`BFPLinear` has two states:

* **frozen** (inference, the default of :meth:`BFPLinear.from_linear`): the weight lives
  only as a BFP tensor (``weight_mantissa``/``weight_exponent`` buffers, ~1/4 the bytes of
  fp32 for MXINT8), and ``forward`` calls :func:`llmcore.ops.bfp_linear`.
* **trainable**: an fp32 master ``weight`` parameter. ``forward`` quantises W (and X when
  ``act_format`` is set) and multiplies the quantised operands; ``backward`` quantises
  along each GEMM's own reduction axis, as the MX training recipe does —
  grad_input = Q(dY) Q(Wᵀ) (reduction over N), grad_weight = Q(dYᵀ) Q(Xᵀ) (reduction
  over the tokens) — and passes gradients straight through the rounding to the master
  weight. ``full_precision_backward=True`` keeps both backward GEMMs in full precision.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.formats import BFPFormat, get_format
from llmcore.ops._dispatch import kernel_supported
from llmcore.ops.bfp import (
    BFPTensor,
    _straight_through_grads,
    bfp_linear,
    bfp_linear_trainable,
    bfp_quantize,
    plain_layout,
    tile_layout,
    tiles_supported,
)


# ---- the GEMV tile layout of frozen BFP weights (docs/bfp.md) ------------------------------
# A module's ``weight_mantissa`` / ``weight_exponent`` buffers may hold the tile layout
# (3-D: llmcore.ops.bfp.tile_layout) for the CPU kernels; everything outside the kernels
# (state_dict, qweight, load_state_dict) sees the plain layout.
def _is_tiled(module: nn.Module) -> bool:
    m = module._buffers.get("weight_mantissa")
    return m is not None and m.dim() == 3


def _plain_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: a tiled weight is saved in the plain layout."""
    if _is_tiled(module):
        m, e = plain_layout(module.weight_mantissa, module.weight_exponent, module.format,
                            module._bfp_k)
        state_dict[prefix + "weight_mantissa"], state_dict[prefix + "weight_exponent"] = m, e


def _tiled_load(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: plain tensors loaded into a tiled module are tiled first
    (then copied in place, so a shared buffer stays shared)."""
    km, ke = prefix + "weight_mantissa", prefix + "weight_exponent"
    if _is_tiled(module) and km in state_dict and ke in state_dict \
            and state_dict[km].dim() == 2 and state_dict[km].shape[0] % 16 == 0:
        state_dict[km], state_dict[ke] = tile_layout(state_dict[km], state_dict[ke],
                                                     module.format, module._bfp_k)


def _plain_weight(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mantissa, exponent) of a frozen module's weight in the plain layout."""
    if _is_tiled(module):
        return plain_layout(module.weight_mantissa, module.weight_exponent, module.format,
                            module._bfp_k)
    return module.weight_mantissa, module.weight_exponent


class BFPLinear(nn.Module):
    """Drop-in ``nn.Linear`` whose matrix product runs in a block-floating-point format.

    Parameters
    ----------
    in_features, out_features, bias : as nn.Linear
    format : str or BFPFormat
        Weight format (default ``"mxint8"``).
    act_format : str or BFPFormat, optional
        Quantise activations too (integer block products); None keeps them float.
    trainable : bool
        Keep an fp32 master weight and train through quantised GEMMs (see module doc).
        False stores only the BFP weight.
    grad_format : str or BFPFormat, optional
        Format of the backward GEMMs (default: ``act_format`` or ``format``).
    full_precision_backward : bool
        Run the backward GEMMs in full precision (straight-through all the same).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 format: str | BFPFormat = "mxint8", act_format: str | BFPFormat | None = None,
                 trainable: bool = False, grad_format: str | BFPFormat | None = None,
                 full_precision_backward: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = get_format(format)
        self.act_format = None if act_format is None else get_format(act_format)
        self.grad_format = get_format(grad_format or act_format or format)
        self.full_precision_backward = full_precision_backward
        self.trainable = trainable
        lin = nn.Linear(in_features, out_features, bias=bias, device=device,
                        dtype=torch.float32)
        self.bias = None if lin.bias is None else nn.Parameter(
            lin.bias.detach().to(dtype or torch.float32), requires_grad=trainable)
        self.weight_dtype = dtype or torch.float32
        self._register_state_dict_hook(_plain_state_dict)
        self._register_load_state_dict_pre_hook(_tiled_load, with_module=True)
        if trainable:
            self.weight = nn.Parameter(lin.weight.detach())
        else:
            self.weight = None
            self._set_quantized(lin.weight.detach())

    def _set_quantized(self, w: torch.Tensor) -> None:
        q = bfp_quantize(w.float(), self.format)
        self.register_buffer("weight_mantissa", q.mantissa)
        self.register_buffer("weight_exponent", q.exponent)

    @property
    def qweight(self) -> BFPTensor:
        """The BFP weight [out_features, in_features] (quantised now if trainable)."""
        if self.weight is not None:
            return bfp_quantize(self.weight.detach(), self.format)
        m, e = _plain_weight(self)
        return BFPTensor(m, e, self.format, (self.out_features, self.in_features),
                         self.weight_dtype)

    @property
    def _bfp_k(self) -> int:
        return self.in_features

    # -- the tile layout ---------------------------------------------------------------------
    @property
    def tiled(self) -> bool:
        """Whether the weight buffers hold the GEMV tile layout (:meth:`tile_`)."""
        return _is_tiled(self)

    def can_tile(self) -> bool:
        """Whether :meth:`tile_` applies: a frozen weight on the CPU, int8 activations in the
        weight's blocks of 32, out_features a multiple of 16 and in_features of 32."""
        af = self.act_format
        return (self.weight is None and not self.tiled and af is not None
                and af.block_size == self.format.block_size
                and self.weight_mantissa.device.type == "cpu"
                and tiles_supported((self.out_features, self.in_features), self.format))

    def tile_(self) -> BFPLinear:
        """Store the weight in the GEMV tile layout (in place; the same bytes reordered), which
        the CPU int8-activation kernels read as one stream: decode and verification steps
        get faster (docs/bfp.md). ``state_dict``, :attr:`qweight` and saving still see the
        plain layout; moving the layer off the CPU restores it. Raises ValueError when
        :meth:`can_tile` is False."""
        if self.tiled:
            return self
        if not self.can_tile():
            where = "a trainable weight" if self.weight is not None else \
                f"device {self.weight_mantissa.device}"
            raise ValueError(
                "tile_ needs a frozen BFPLinear on the CPU with act_format in the weight's "
                f"blocks of 32, out_features % 16 == 0 and in_features % 32 == 0; got "
                f"{self.extra_repr()} ({where})")
        self.weight_mantissa, self.weight_exponent = tile_layout(
            self.weight_mantissa, self.weight_exponent, self.format, self.in_features)
        return self

    def untile_(self) -> BFPLinear:
        """Back to the plain layout (in place); a no-op when not tiled."""
        if self.tiled:
            self.weight_mantissa, self.weight_exponent = _plain_weight(self)
        return self

    def _apply(self, fn, *args, **kwargs):
        # The tiles are a CPU layout: a weight moved elsewhere goes back to the plain one.
        out = super()._apply(fn, *args, **kwargs)
        if self.tiled and self.weight_mantissa.device.type != "cpu":
            self.untile_()
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str | BFPFormat = "mxint8",
                    act_format: str | BFPFormat | None = None, trainable: bool = False,
                    **kwargs) -> BFPLinear:
        """Quantise an ``nn.Linear`` (its weights are copied; the original is untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w, b = linear.weight.detach(), linear.bias
        if not trainable:  # quantise the weight once, straight from the linear's dtype
            q = bfp_quantize(w, format)  # (the same bits as from its fp32 copy, without one)
            q = BFPTensor(q.mantissa, q.exponent, q.format, q.shape, w.dtype)
            return cls.from_bfp(q, None if b is None else b.detach().clone(), act_format,
                                **kwargs)
        mod = cls(linear.in_features, linear.out_features, bias=b is not None,
                  format=format, act_format=act_format, trainable=True, device=w.device,
                  dtype=w.dtype, **kwargs)
        with torch.no_grad():
            mod.weight.copy_(w.float())
            if b is not None:
                mod.bias.copy_(b)
        return mod

    @classmethod
    def from_bfp(cls, weight: BFPTensor, bias: torch.Tensor | None = None,
                 act_format: str | BFPFormat | None = None, **kwargs) -> BFPLinear:
        """A frozen BFPLinear around ``weight`` [out_features, in_features] as it is: its
        mantissas and exponents become the layer's buffers (no copy, no quantisation; a
        saved BFP checkpoint loads bit for bit), ``weight.dtype`` the layer's dtype and
        ``bias`` [out_features] (that dtype) its bias."""
        if not isinstance(weight, BFPTensor) or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D BFPTensor, got {weight!r}")
        out_f, in_f = weight.shape
        with torch.device("meta"):  # the fp32 master weight of __init__ costs nothing here
            mod = cls(in_f, out_f, bias=bias is not None, format=weight.format,
                      act_format=act_format, trainable=True, dtype=weight.dtype, **kwargs)
        del mod.weight
        mod.weight, mod.trainable = None, False
        mod.register_buffer("weight_mantissa", weight.mantissa)
        mod.register_buffer("weight_exponent", weight.exponent)
        mod.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype),
                                                          requires_grad=False)
        return mod

    def freeze(self) -> BFPLinear:
        """Drop the master weight and keep only the BFP weight (for inference)."""
        if self.weight is not None:
            w = self.weight.detach()
            del self.weight
            self.weight = None
            self._set_quantized(w)
            self.trainable = False
            if self.bias is not None:
                self.bias.requires_grad_(False)
        return self

    def _decode_op_args(self, x: torch.Tensor, grad_ok: bool = False) -> tuple | None:
        """(a_bits, w_bits, block_size) of the one-call int8-activation path
        (``llmcore::bfp_act_linear``) when it takes this call: a frozen weight, activations
        quantised in the weight's block size, x on the CPU with this layer's in_features
        and no gradient to record (``grad_ok``: gradients allowed). None otherwise (the
        general path checks and raises)."""
        af, f = self.act_format, self.format
        if (self.weight is not None or af is None or af.block_size != f.block_size
                or x.device.type != "cpu" or x.shape[-1] != self.in_features):
            return None
        if not grad_ok and _records_grad(x, self.bias):
            return None
        if not _cpu_kernel("bfp_act_linear", x.dtype):
            return None
        return af.mantissa_bits, f.mantissa_bits, f.block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if self.weight is None:
            args = self._decode_op_args(x, grad_ok=True)
            if args is not None and not _records_grad(x, self.bias):
                # the per-token path: one op call, nothing else
                return torch.ops.llmcore.bfp_act_linear(x, self.weight_mantissa,
                                                        self.weight_exponent, *args, False,
                                                        self.bias)
            if args is not None and _is_tiled(self):  # the same op, and autograd
                return _TiledFrozenLinear.apply(x, self.bias, self.weight_mantissa,
                                                self.weight_exponent, self.format,
                                                self.in_features, args)
            return bfp_linear(x, self.qweight, self.bias, act_format=self.act_format)
        if not torch.is_grad_enabled():
            q = bfp_quantize(self.weight.detach().to(x.dtype) if self.act_format is None
                             else self.weight.detach(), self.format)
            return bfp_linear(x, q, self.bias, act_format=self.act_format)
        grad_format = None if self.full_precision_backward else self.grad_format
        return bfp_linear_trainable(x, self.weight, self.bias, self.format, self.act_format,
                                    grad_format)

    def extra_repr(self) -> str:
        act = self.act_format.name if self.act_format else None
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format.name}, act_format={act}, "
                f"trainable={self.weight is not None}")


def _records_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd records this call (x, or the bias, requires a gradient)."""
    return torch.is_grad_enabled() and (x.requires_grad
                                        or (bias is not None and bias.requires_grad))


class _TiledFrozenLinear(torch.autograd.Function):
    """A frozen layer whose weight holds the tile layout, called with a gradient to record
    (a user's forward without ``no_grad``, an input that requires grad): the forward is
    the inference op on the tiles (the same bits as under inference mode, and no plain
    copy of the weight laid out per call, which the general path, bfp_linear on
    ``qweight``, makes); the backward lays the weight out and dequantises it only when it
    runs, and gives the straight-through gradients of x and the bias as bfp_linear's."""

    @staticmethod
    def forward(ctx, x, bias, mant, exp, fmt, k, args):
        ctx.save_for_backward(mant, exp)
        ctx.fmt, ctx.k = fmt, k
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return torch.ops.llmcore.bfp_act_linear(x, mant, exp, *args, False, bias)

    @staticmethod
    def backward(ctx, grad_y):
        mant, exp = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[:2]
        w = None
        if need_x:  # the weight laid out plain and dequantised only here
            m, e = plain_layout(mant, exp, ctx.fmt, ctx.k)
            w = BFPTensor(m, e, ctx.fmt, (m.shape[0], ctx.k), torch.float32).dequantize(
                torch.float32)
        grad_x, _, grad_b = _straight_through_grads(
            grad_y.reshape(-1, grad_y.shape[-1]), None, w, None, need_x, False,
            need_b and ctx.bias_dtype is not None)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype).reshape(*grad_y.shape[:-1], ctx.k)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_b, None, None, None, None, None


_CPU_KERNELS: dict = {}  # (op, dtype) -> kernel_supported on the CPU (fixed once loaded)


def _cpu_kernel(op: str, dtype: torch.dtype) -> bool:
    """kernel_supported(op, cpu, dtype), asked once per (op, dtype): this is on the
    per-token path."""
    if torch.compiler.is_compiling():  # traced as a constant: no guard on the dict
        return kernel_supported(op, torch.device("cpu"), dtype)
    ok = _CPU_KERNELS.get((op, dtype))
    if ok is None:
        ok = _CPU_KERNELS[(op, dtype)] = kernel_supported(op, torch.device("cpu"), dtype)
    return ok


def bfp_linears_shared_input(x: torch.Tensor, layers) -> list[torch.Tensor] | None:
    """``[layer(x) for layer in layers]`` for frozen :class:`BFPLinear` layers of one weight
    and activation format in a single op call (``llmcore::bfp_act_linear_multi``: x is
    quantised once for all of them: q/k/v, gate/up), or None when that call does not take
    them (another module type, a trainable or weight-only layer, formats that differ, a
    gradient to record): the caller then runs the layers one by one."""
    first = layers[0]
    if type(first) is not BFPLinear:
        return None
    args = first._decode_op_args(x)
    if args is None or not _cpu_kernel("bfp_act_linear_multi", x.dtype):
        return None
    for m in layers[1:]:  # x, the grad mode and the kernel were checked with the first
        if (type(m) is not BFPLinear or m.weight is not None or m.format != first.format
                or m.tiled != first.tiled
                or m.act_format != first.act_format or m.in_features != first.in_features
                or (m.bias is not None and m.bias.requires_grad and torch.is_grad_enabled())):
            return None
    return torch.ops.llmcore.bfp_act_linear_multi(
        x, [m.weight_mantissa for m in layers], [m.weight_exponent for m in layers], *args,
        False, [m.bias for m in layers])


def _excluded(name: str, exclude) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in exclude)


def replace_linear(model: nn.Module, name: str, format: str | BFPFormat = "mxint8",
                   act_format: str | BFPFormat | None = None, trainable: bool = False,
                   **kwargs) -> BFPLinear:
    """Swap the ``nn.Linear`` submodule ``name`` of ``model`` (in place) for
    ``BFPLinear.from_linear(...)`` of it and return the new module. A weight shared with
    another module (a head tied to the embedding) is copied into the BFP weight; the other
    module keeps the original."""
    linear = model.get_submodule(name)
    if type(linear) is not nn.Linear:
        raise TypeError(f"{name} must be an nn.Linear, got {type(linear).__name__}")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    mod = BFPLinear.from_linear(linear, format, act_format, trainable, **kwargs)
    setattr(parent, child, mod)
    return mod


def quantize_model(model: nn.Module, format: str | BFPFormat = "mxint8",
                   act_format: str | BFPFormat | None = None, exclude=("lm_head",),
                   trainable: bool = False, **kwargs) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) with a :class:`BFPLinear`.

    ``exclude`` holds module names or glob patterns (``"lm_head"``, ``"*.gate"``) left in
    full precision; a name matches if it equals the pattern, ends with ``"." + pattern``
    or matches the glob. Returns ``model``.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    fmt = get_format(format)
    targets = [name for name, mod in model.named_modules()
               if type(mod) is nn.Linear and not _excluded(name, exclude)]
    for name in targets:
        replace_linear(model, name, fmt, act_format, trainable, **kwargs)
    return model


def bfp_linear_reference(x: torch.Tensor, linear: BFPLinear) -> torch.Tensor:
    """F.linear with the dequantised weight: what a frozen weight-only BFPLinear computes."""
    return F.linear(x, linear.qweight.dequantize(x.dtype), linear.bias)
