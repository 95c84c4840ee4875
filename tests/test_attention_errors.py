"""Fused attention, bad inputs: the Python faces raise ValueError/TypeError naming the
argument; the bindings called directly refuse bad shapes without crashing.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DTYPES, assert_close_nan, randn, run_program

from llmcore import ops
from llmcore import reference as ref


def _good(device, dtype=torch.float32):
    d = 16
    return dict(q=randn((2, 5, 4, d), dtype, device), k=randn((2, 7, 2, d), dtype, device),
                v=randn((2, 7, 2, d), dtype, device))


BAD_DENSE = {
    "q 3-D": (lambda t: t.update(q=t["q"][0]), r"\bq\b.*4-D"),
    "k 5-D": (lambda t: t.update(k=t["k"][None]), r"\bk\b.*4-D"),
    "heads not a multiple": (lambda t: t.update(k=t["k"][:, :, :1].expand(2, 7, 3, 16),
                                                v=t["v"][:, :, :1].expand(2, 7, 3, 16)),
                             r"heads"),
    "head_dim mismatch": (lambda t: t.update(k=t["k"][..., :8], v=t["v"][..., :8]),
                          r"head_dim"),
    "k/v shape mismatch": (lambda t: t.update(v=t["v"][:, :6]), r"\bk\b.*\bv\b"),
    "dtype mismatch": (lambda t: t.update(k=t["k"].bfloat16()), r"dtype"),
    "float64": (lambda t: t.update(q=t["q"].double()), r"\bq\b.*float64"),
    "int": (lambda t: t.update(v=t["v"].int()), r"\bv\b.*int32"),
    "batch mismatch": (lambda t: t.update(k=t["k"][:1], v=t["v"][:1]), r"batch"),
    "not a tensor": (lambda t: t.update(q=t["q"].tolist()), r"\bq\b.*Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_DENSE))
def test_bad_inputs_dense(case, device):
    t = _good(device)
    mutate, pattern = BAD_DENSE[case]
    mutate(t)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_bad_softmax_scale(scale, device):
    t = _good(device)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.attention(t["q"], t["k"], t["v"], softmax_scale=scale)
    q, k, v = (x.flatten(0, 1) for x in (t["q"], t["k"][:, :5], t["v"][:, :5]))
    cu = torch.tensor([0, 5, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.attention_varlen(q, k, v, cu, cu, 5, 5, softmax_scale=scale)


def _varlen_args(device):
    q = randn((12, 4, 16), torch.float32, device)
    k = randn((15, 2, 16), torch.float32, device)
    v = randn((15, 2, 16), torch.float32, device)
    cq = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 6, 9, 15], dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7,
                max_seqlen_k=6)


def _cu(a, like):
    return torch.tensor(a, dtype=like.dtype, device=like.device)


BAD_VARLEN = {
    "q 4-D": (lambda a: a.update(q=a["q"][None]), r"\bq\b.*3-D"),
    "cu int64": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()),
                 r"cu_seqlens_q.*int32"),
    "cu 2-D": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][None]), r"cu_seqlens_k"),
    "cu not at 0": (lambda a: a.update(cu_seqlens_q=_cu([1, 5, 5, 12], a["cu_seqlens_q"])),
                    r"cu_seqlens_q.*start at 0"),
    "cu decreasing": (lambda a: a.update(cu_seqlens_k=_cu([0, 9, 6, 15], a["cu_seqlens_k"])),
                      r"cu_seqlens_k.*non-decreasing"),
    "cu wrong total q": (lambda a: a.update(cu_seqlens_q=_cu([0, 5, 5, 11],
                                                             a["cu_seqlens_q"])),
                         r"cu_seqlens_q.*12"),
    "cu wrong total k": (lambda a: a.update(cu_seqlens_k=_cu([0, 6, 9, 16],
                                                             a["cu_seqlens_k"])),
                         r"cu_seqlens_k.*15"),
    "more rows than max_seqlen_q": (lambda a: a.update(max_seqlen_q=6), r"max_seqlen"),
    "more rows than max_seqlen_k": (lambda a: a.update(max_seqlen_k=5), r"max_seqlen"),
    "cu length mismatch": (lambda a: a.update(cu_seqlens_k=_cu([0, 15], a["cu_seqlens_k"])),
                           r"cu_seqlens_q.*cu_seqlens_k.*length"),
    "heads not a multiple": (lambda a: a.update(k=a["k"][:, :1].expand(15, 3, 16),
                                                v=a["v"][:, :1].expand(15, 3, 16)),
                             r"heads"),
    "head_dim mismatch": (lambda a: a.update(v=a["v"][..., :8], k=a["k"][..., :8]),
                          r"head_dim"),
    "dtype mismatch": (lambda a: a.update(v=a["v"].half()), r"dtype"),
}


@pytest.mark.parametrize("case", list(BAD_VARLEN))
def test_bad_inputs_varlen(case, device):
    a = _varlen_args(device)
    mutate, pattern = BAD_VARLEN[case]
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.attention_varlen(**a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bad_inputs_device_mismatch():
    t = _good("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="device"):
        ops.attention(t["q"], t["k"].cpu(), t["v"])
    a = _varlen_args("cuda")
    a["cu_seqlens_k"] = a["cu_seqlens_k"].cpu()
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.attention_varlen(**a)
    a = _varlen_args("cuda")
    a["v"] = a["v"].cpu()
    with pytest.raises(ValueError, match="device"):
        ops.attention_varlen(**a)


def test_bindings_reject_bad_shapes(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    p = run_program("attention_bad_shapes", device.type, str(dtype)[6:], timeout=240)
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode >= 0, f"binding crashed (signal {-p.returncode}); last output:\n{tail}"
    assert p.returncode == 0, f"bindings accepted or mishandled bad inputs:\n{tail}"



# ---------------------------------------------------------------------------------------
# Non-finite values: a NaN a row sees propagates; a masked value never reaches an output
# (forward and backward, dense and varlen, every CPU kernel path).
# ---------------------------------------------------------------------------------------
NAN = float("nan")
NONFINITE = {
    # name: (mutate q, k, v in place, causal)
    "masked v NaN": (lambda q, k, v: v[:, -3:].fill_(NAN), True),
    "masked v Inf": (lambda q, k, v: v[:, -3:].fill_(float("inf")), True),
    "masked k NaN": (lambda q, k, v: k[:, -2:, :, 1:3].fill_(NAN), True),
    "visible k NaN": (lambda q, k, v: k[0, 3, 0, 3:4].fill_(NAN), False),
    "visible v NaN": (lambda q, k, v: v[1, 0, 1, 0:1].fill_(NAN), True),
    "NaN query row": (lambda q, k, v: q[0, 4].fill_(NAN), True),
    "Inf query": (lambda q, k, v: q[1, 2, 0, 5:6].fill_(float("inf")), False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_rules(case, dtype, cpu_isa):
    mutate, causal = NONFINITE[case]
    q, k, v = (randn((2, 70, 2, 24), dtype, "cpu") for _ in range(3))
    mutate(q, k, v)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = ref.attention_fwd(q.detach(), k.detach(), v.detach(), causal)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close_nan(out, ref_out, tol, f"{case} out")
    assert_close_nan(lse, ref_lse, 1e-3, f"{case} lse")
    if case.startswith("masked"):  # rows 0 .. 66 never see the last keys
        assert torch.isfinite(out[:, :-3]).all()
    if case in ("visible k NaN", "NaN query row"):
        row = (0, slice(None), 0) if case == "visible k NaN" else (0, 4)
        assert out[row].isnan().all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = ref.attention_bwd(grad, q.detach(), k.detach(), v.detach(), None, None, causal, None)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert_close_nan(g, w, 10 * tol, f"{case} grad_{name}")


def test_nonfinite_varlen_stays_in_its_sequence(cpu_isa):
    """NaN in one packed sequence (and in keys its own causal mask hides) reaches no other."""
    cu_q = torch.tensor([0, 5, 5, 30], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 40], dtype=torch.int32)
    q, k, v = randn((30, 2, 16), torch.float32, "cpu"), *(randn((40, 1, 16), torch.float32, "cpu")
                                                         for _ in range(2))
    v[38:] = NAN  # hidden from every row of sequence 2 but its last ones
    k[8] = NAN  # sequence 1 has no queries
    q[2] = NAN  # a NaN query row of sequence 0
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.attention_varlen(q, k, v, cu_q, cu_k, 25, 31, causal=True, return_lse=True)
    ref_out, ref_lse = ref.attention_varlen_fwd(q.detach(), k.detach(), v.detach(), cu_q, cu_k,
                                                25, 31, True)
    assert_close_nan(out, ref_out, 1e-4, "out")
    assert_close_nan(lse, ref_lse, 1e-3, "lse")
    assert out[2].isnan().all() and torch.isfinite(out[torch.arange(30) != 2][:-2]).all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = ref.attention_varlen_bwd(grad, q.detach(), k.detach(), v.detach(), None, None, cu_q,
                                    cu_k, 25, 31, True, None)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert_close_nan(g, w, 1e-3, f"grad_{name}")
