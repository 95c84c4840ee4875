"""BFPLinear, quantize_model, training through quantised GEMMs, torch.compile."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcore.nn import BFPLinear, quantize_model
from llmcore.ops import bfp_quantize


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_frozen_matches_dequantised_linear():
    lin = nn.Linear(97, 33)
    q = BFPLinear.from_linear(lin, "mxint8")
    x = torch.randn(4, 7, 97)
    w = bfp_quantize(lin.weight.detach(), "mxint8").dequantize()
    ref = F.linear(x.double(), w.double(), lin.bias.detach().double())
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert q.weight is None and q.weight_mantissa.dtype == torch.int8
    assert q.weight_mantissa.shape == (33, 97) and q.weight_exponent.shape == (33, 4)


def test_frozen_act_quantised_close_to_fp32():
    lin = nn.Linear(256, 64)
    q = BFPLinear.from_linear(lin, "mxint8", act_format="mxint8")
    x = torch.randn(8, 256)
    err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert err < 2e-2, err


def test_state_dict_roundtrip_exact():
    lin = nn.Linear(64, 48)
    a = BFPLinear.from_linear(lin, "mxint4")
    b = BFPLinear(64, 48, format="mxint4")
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # plain tensors only
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))


def test_quantize_model_replaces_and_excludes():
    m = nn.Sequential()
    m.add_module("up", nn.Linear(16, 32))
    m.add_module("act", nn.GELU())
    m.add_module("lm_head", nn.Linear(32, 10))
    quantize_model(m, "msfp16")
    assert isinstance(m.up, BFPLinear) and m.up.format.name == "msfp16"
    assert type(m.lm_head) is nn.Linear
    quantize_model(m, exclude=())
    assert isinstance(m.lm_head, BFPLinear)


def test_trainable_gradients_straight_through_full_precision():
    """With a full-precision backward the gradients are exactly F.linear's."""
    lin = nn.Linear(40, 24)
    q = BFPLinear.from_linear(lin, "mxint8", act_format="mxint8", trainable=True,
                              full_precision_backward=True)
    x = torch.randn(5, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(5, 24)
    q(x).backward(g)
    lin(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, lin.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, lin.bias.grad)


def test_trainable_quantised_backward_is_each_gemm_quantised_along_its_reduction():
    lin = nn.Linear(64, 48)
    q = BFPLinear.from_linear(lin, "mxint8", act_format="mxint8", trainable=True)
    x = torch.randn(37, 64, requires_grad=True)
    g = torch.randn(37, 48)
    q(x).backward(g)

    def deq(t):  # quantise along the last axis and back
        return bfp_quantize(t.contiguous(), "mxint8").dequantize().double()

    w = lin.weight.detach()
    want_dx = deq(g) @ deq(w.T).T  # reduction over N: dY [T,N] and W^T [K,N]
    want_dw = deq(g.T) @ deq(x.detach().T).T  # reduction over T: dY^T [N,T], X^T [K,T]
    torch.testing.assert_close(x.grad.double(), want_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.grad.double(), want_dw, rtol=1e-5, atol=1e-4)
    # and they are close to (not equal to) the exact gradients
    assert not torch.equal(q.weight.grad, g.T @ x.detach())
    rel = (q.weight.grad - g.T @ x.detach()).norm() / (g.T @ x.detach()).norm()
    assert rel < 3e-2


def _train_block(make_linear, steps=150, seed=0):
    """A transformer-style MLP block on a fixed regression task; returns the final loss."""
    torch.manual_seed(seed)
    d, h = 64, 256
    teacher = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
    with torch.no_grad():  # outputs of order 1, so the task is not trivial
        for p in teacher.parameters():
            p.mul_(3)
    torch.manual_seed(seed + 1)
    model = nn.Sequential(nn.LayerNorm(d), make_linear(nn.Linear(d, h)), nn.GELU(),
                          make_linear(nn.Linear(h, d)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 2)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, d, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-10:]) / 10


@pytest.mark.slow
def test_mxint8_training_matches_fp32_loss():
    """All GEMMs (forward, grad_input, grad_weight) in MXINT8: same final loss within a
    few percent of fp32 on the same data and steps."""
    first, fp32 = _train_block(lambda l: l)
    _, mx = _train_block(lambda l: BFPLinear.from_linear(l, "mxint8", act_format="mxint8",
                                                          trainable=True))
    assert fp32 < 0.5 * first, (fp32, first)  # it really trained
    assert abs(mx - fp32) / fp32 < 0.05, (mx, fp32)


def test_freeze_drops_master_weight():
    q = BFPLinear(32, 16, trainable=True)
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = q(x)
    q.freeze()
    assert q.weight is None and not any(p.requires_grad for p in q.parameters())
    assert torch.equal(q(x), before)


def test_torch_compile_model_with_bfplinear():
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32))
    quantize_model(model, "mxint8", exclude=())
    x = torch.randn(5, 64)
    eager = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_errors_are_clear():
    with pytest.raises(TypeError, match="nn.Linear"):
        BFPLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="unknown BFP format"):
        BFPLinear(8, 8, format="mxint9")
    q = BFPLinear(8, 4)
    with pytest.raises(ValueError, match="x.shape"):
        q(torch.randn(2, 9))
