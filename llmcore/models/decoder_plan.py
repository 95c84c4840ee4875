"""The arguments of ``llmcore::decoder_layers`` for a :class:`~llmcore.models.Transformer`:
every block of a cached inference step in one op call (no Python between the kernels).

A plan is built once per model and dtype and reused while the model keeps its modules and
tensors: each step checks every module and tensor the plan holds (identity, type and
dtype; ~30 µs for 12 layers), so replacing a module, quantising again, loading with
``assign=True`` or converting a part of the model builds a new plan, and in-place weight
updates need nothing. A model the op does not cover (another block or norm type, a
trainable or mixed-block-size BFP linear, a dense weight of another dtype, a weight-only
BFP bias of another dtype, norms of different eps) gets a plan that says so, checked the
same way, and its steps take the Python chain, which calls the same kernels. A covered
plan also holds the embedding and the output head when ``llmcore::greedy_decode`` takes
them (``Transformer.decode_greedy``: whole greedy steps in one op call).
"""

from __future__ import annotations

from operator import attrgetter, is_

import torch
from torch import nn

from llmcore.nn import BFPEmbedding, BFPLinear
from llmcore.ops._dispatch import kernel_supported

_CPU = torch.device("cpu")
DENSE, WEIGHT_ONLY, INT_ACT = 0, 1, 2  # linear kinds of the op's linear_spec
_DTYPE = attrgetter("dtype")


class DecoderPlan:
    """``norm_weight``, ``eps``, ``linear`` and ``linear_spec`` of the op for one model and
    dtype and ``weights``, the ``DecoderWeights`` object made of them that the op takes
    (``covered`` False: the op does not take this model), and the checks that say the
    model still matches them."""

    __slots__ = ("dtype", "covered", "norm_weight", "eps", "linear", "linear_spec", "weights",
                 "head", "head_spec", "embedding", "_same", "_types", "_dtypes", "_keys")

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.covered, self.eps = dtype, False, 0.0
        self.norm_weight: list = []
        self.linear: list = []
        self.linear_spec: list[int] = []
        self.weights = None  # torch.classes.llmcore.DecoderWeights of the lists above
        # greedy_decode's rest of the model: the head as one linear (3 tensors, 4 ints) and
        # the embedding (table or mantissas, exponents or None, mantissa bits, block size);
        # None when that op does not take them (the layers may still be covered)
        self.head: list | None = None
        self.head_spec: list[int] | None = None
        self.embedding: tuple | None = None
        self._same: list = []    # (dict, key, object): d.get(key) is object
        self._types: list = []   # (object, type): type(object) is type
        self._dtypes: list = []  # (tensor, dtype)
        self._keys: tuple | None = None

    def __reduce__(self):
        """A copied or pickled model gets no plan (it holds a C++ object and the copied
        model's tensors are others): the copy builds its own at its first step."""
        return (_no_plan, ())

    def valid(self, dtype: torch.dtype) -> bool:
        """Whether the model still holds exactly the modules and tensors of this plan."""
        if dtype is not self.dtype:
            return False
        if self._keys is None:  # (the checks in C-level loops: ~80 per layer, every step)
            self._keys = ([d for d, _, _ in self._same], [k for _, k, _ in self._same],
                          [o for _, _, o in self._same], [o for o, _ in self._types],
                          [t for _, t in self._types], [t for t, _ in self._dtypes],
                          [dt for _, dt in self._dtypes])
        ds, ks, objs, typed, types, tensors, dtypes = self._keys
        return (all(map(is_, map(dict.get, ds, ks), objs))
                and all(map(is_, map(type, typed), types))
                and all(map(is_, map(_DTYPE, tensors), dtypes)))

    @classmethod
    def build(cls, model: nn.Module, dtype: torch.dtype, block_cls: type, norm_cls: type
              ) -> DecoderPlan:
        """The plan of ``model`` (blocks of type ``block_cls``, norms ``norm_cls``) for
        activations of ``dtype``."""
        plan = cls(dtype)
        if kernel_supported("decoder_layers", _CPU, dtype):
            plan.covered = plan._fill(model, block_cls, norm_cls)
        if plan.covered:  # the op's side of the plan, unpacked in C++ once
            if kernel_supported("greedy_decode", _CPU, dtype):
                plan._fill_ends(model)
            c = model.config
            plan.weights = torch.classes.llmcore.DecoderWeights(
                plan.norm_weight, plan.eps, plan.linear, plan.linear_spec, c.n_heads,
                c.n_kv_heads)
        return plan

    def _module(self, owner: nn.Module, name: str):
        m = owner._modules.get(name)
        self._same.append((owner._modules, name, m))
        self._types.append((m, type(m)))
        return m

    def _fill(self, model, block_cls, norm_cls) -> bool:
        layers = self._module(model, "layers")
        final = self._module(model, "norm")
        if type(final) is not norm_cls or not isinstance(layers, nn.ModuleList):
            return False
        self.eps = float(final.eps)
        for i in range(len(layers)):
            b = self._module(layers, str(i))
            if type(b) is not block_cls or not (self._norm(b, "input_layernorm", norm_cls)
                                                and self._norm(b, "post_attention_layernorm",
                                                               norm_cls)):
                return False
            for owner_name, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                owner = self._module(b, owner_name)
                for name in names:
                    if not self._linear(self._module(owner, name), self.linear,
                                        self.linear_spec):
                        return False
        return self._norm(model, "norm", norm_cls)

    def _fill_ends(self, model) -> None:
        """The head and embedding of greedy_decode, when it takes them: a head the layers'
        op would take, an ``nn.Embedding`` of the plan's dtype or a CPU :class:`BFPEmbedding`
        whose lookup is ``bfp_embedding``'s."""
        head, spec = [], []
        if not self._linear(self._module(model, "lm_head"), head, spec):
            return
        e = self._module(model, "embed_tokens")
        if type(e) is nn.Embedding:
            w = e.weight
            self._same.append((e._parameters, "weight", w))
            self._dtypes.append((w, w.dtype))
            if w.dtype != self.dtype or w.device.type != "cpu":
                return
            embedding = (w, None, 0, 0)
        elif type(e) is BFPEmbedding:
            m, x, f = e.weight_mantissa, e.weight_exponent, e.format
            self._same.extend([(e._buffers, "weight_mantissa", m),
                               (e._buffers, "weight_exponent", x),
                               (e.__dict__, "format", f),
                               (e.__dict__, "weight_dtype", e.weight_dtype)])
            if (e.weight_dtype != self.dtype or m.device.type != "cpu"
                    or not kernel_supported("bfp_embedding", _CPU, self.dtype)):
                return
            embedding = (m, x, f.mantissa_bits, f.block_size)
        else:
            return
        self.head, self.head_spec, self.embedding = head, spec, embedding

    def _norm(self, owner: nn.Module, name: str, norm_cls: type) -> bool:
        n = self._module(owner, name)
        if type(n) is not norm_cls:
            return False
        w = n.weight
        self._same.extend([(n._parameters, "weight", w), (n.__dict__, "eps", n.eps)])
        self._dtypes.append((w, w.dtype))
        if w.dtype != self.dtype or n.eps != self.eps:
            return False
        self.norm_weight.append(w)
        return True

    def _linear(self, lin, linear: list, spec: list) -> bool:
        """Adds (weight or mantissa, exponent, bias) to ``linear`` and (kind, a_bits, w_bits,
        block_size) to ``spec`` for one projection; False when the op does not take it as
        its forward runs it."""
        if type(lin) is nn.Linear:
            w, b = lin.weight, lin.bias
            self._same.extend([(lin._parameters, "weight", w), (lin._parameters, "bias", b)])
            self._dtypes.extend((t, t.dtype) for t in (w, b) if t is not None)
            if w.dtype != self.dtype or (b is not None and b.dtype != self.dtype):
                return False
            linear.extend((w, None, b))
            spec.extend((DENSE, 0, 0, 0))
            return True
        if type(lin) is not BFPLinear:
            return False
        f, af, b = lin.format, lin.act_format, lin.bias
        m, e = lin._buffers.get("weight_mantissa"), lin._buffers.get("weight_exponent")
        self._same.extend([(lin._parameters, "weight", lin._parameters.get("weight")),
                           (lin.__dict__, "weight", lin.__dict__.get("weight")),
                           (lin._buffers, "weight_mantissa", m),
                           (lin._buffers, "weight_exponent", e), (lin._parameters, "bias", b),
                           (lin.__dict__, "format", f), (lin.__dict__, "act_format", af)])
        if b is not None:
            self._dtypes.append((b, b.dtype))
        if lin.weight is not None or m is None:  # trainable: the weight is quantised per call
            return False
        if af is None:  # weight-only: the bias is cast to x's dtype there; take it as it is
            if b is not None and b.dtype != self.dtype:
                return False
            kind, a_bits = WEIGHT_ONLY, 0
        elif af.block_size == f.block_size and kernel_supported("bfp_act_linear_multi", _CPU,
                                                                self.dtype):
            kind, a_bits = INT_ACT, af.mantissa_bits
        else:
            return False
        linear.extend((m, e, b))
        spec.extend((kind, a_bits, f.mantissa_bits, f.block_size))
        return True


def _no_plan() -> None:
    return None
