"""Fused decoder-step ops (llmcore.ops.fused) and the one-call int8-activation linears
(bfp_act_linear, bfp_act_linear_multi) against the unfused chains they replace
(llmcore.reference.fused; bfp_quantize then bfp_gemm): odd sizes, every float dtype,
non-contiguous inputs, fresh random inputs."""

import pytest
import torch
from helpers import FLOAT_DTYPES, randn

from llmcore import reference as ref
from llmcore.formats import get_format
from llmcore.ops import bfp_quantize, fused
from llmcore.ops.bfp import bfp_act_linears

SIZES = [1, 7, 97, 1025]


def _tol(dtype):
    # one rounding of the dtype apart at most (fp32: summation order / libm exp)
    return {"float32": (1e-5, 1e-6), "bfloat16": (1.6e-2, 1e-5), "float16": (2e-3, 1e-5)}[
        str(dtype).removeprefix("torch.")]


def _close(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=what)


def _noncontig(shape, dtype):
    """A tensor of ``shape`` that is a strided view (every other row of a wider buffer)."""
    big = randn((*shape[:-1], 2 * shape[-1]), dtype)
    return big[..., ::2] if len(shape) == 1 else big[..., : shape[-1]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_rms_norm_and_add_rms_norm(dtype, n, contiguous):
    shape = (3, 5, n)
    x = randn(shape, dtype) if contiguous else _noncontig(shape, dtype)
    d = randn(shape, dtype) if contiguous else _noncontig(shape, dtype)
    w = randn((n,), dtype)
    _close(fused.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype, "rms_norm")
    s, y = fused.add_rms_norm(x, d, w, 1e-6)
    s_ref, y_ref = ref.add_rms_norm(x, d, w, 1e-6)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)  # one rounded add: exact
    _close(y, y_ref, dtype, "add_rms_norm")
    assert torch.ops.llmcore.rms_norm(x, w, 1e-5).shape == shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d", [2, 14, 64, 130])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rope_in_place(dtype, d, contiguous):
    b, t, h, hk = 2, 3, 5, 1
    if contiguous:
        q, k = randn((b, t, h, d), dtype), randn((b, t, hk, d), dtype)
    else:  # q and k as views into one fused qkv row, as a packed projection gives them
        qkv = randn((b, t, h + 2 * hk, d), dtype)
        q, k = qkv[:, :, :h], qkv[:, :, h:h + hk]
    pos = torch.randint(0, 4000, (b, t)).float()
    freqs = pos.unsqueeze(-1) / 10000 ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_ref, k_ref = q.clone(), k.clone()
    ref.rope_(q_ref, k_ref, cos, sin)
    fused.rope_(q, k, cos, sin)
    _close(q, q_ref, dtype, "rope q")
    _close(k, k_ref, dtype, "rope k")


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_silu_mul(dtype, n, contiguous, isa, monkeypatch):
    monkeypatch.setenv("LLMCORE_CPU_ISA", isa)  # read on each call: both exp paths
    shape = (2, n)
    g = 4 * randn(shape, dtype) if contiguous else 4 * _noncontig(shape, dtype)
    u = randn(shape, dtype) if contiguous else _noncontig(shape, dtype)
    _close(fused.silu_mul(g, u), ref.silu_mul(g, u), dtype, "silu_mul")


def test_mixed_dtypes_take_the_reference():
    x = randn((2, 16), torch.float32)
    w = randn((16,), torch.bfloat16)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    d = randn((2, 16), torch.bfloat16)
    s, y = fused.add_rms_norm(x, d, w.float(), 1e-5)
    assert s.dtype == torch.float32
    torch.testing.assert_close(y, ref.rms_norm(x + d, w.float(), 1e-5))


def test_errors_name_the_argument():
    x = randn((2, 8), torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.llmcore.rms_norm(x, randn((7,)), 1e-5)
    with pytest.raises(ValueError, match="weight must have dtype"):
        torch.ops.llmcore.rms_norm(x, randn((8,), torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="delta must have x's shape"):
        torch.ops.llmcore.add_rms_norm(x, randn((1, 8)), randn((8,)), 1e-5)
    q = randn((1, 2, 2, 7))
    with pytest.raises(ValueError, match="even head_dim"):
        torch.ops.llmcore.rope_(q, q.clone(), randn((1, 2, 7)), randn((1, 2, 7)))
    with pytest.raises(ValueError, match="up must have gate's shape"):
        torch.ops.llmcore.silu_mul(x, randn((8, 2)))


def test_opcheck():
    x, d, w = randn((3, 40)), randn((3, 40)), randn((40,))
    torch.library.opcheck(torch.ops.llmcore.rms_norm, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.llmcore.add_rms_norm, (x, d, w, 1e-5))
    torch.library.opcheck(torch.ops.llmcore.silu_mul, (x, d))
    q, k, c = randn((1, 2, 3, 8)), randn((1, 2, 1, 8)), randn((1, 2, 8))
    torch.library.opcheck(torch.ops.llmcore.rope_, (q, k, c, c.clone()))
    wq = bfp_quantize(randn((24, 40)), "mxint8")
    torch.library.opcheck(torch.ops.llmcore.bfp_act_linear,
                          (x, wq.mantissa, wq.exponent, 8, 8, 32, False, None))
    torch.library.opcheck(torch.ops.llmcore.bfp_act_linear_multi,
                          (x, [wq.mantissa] * 2, [wq.exponent] * 2, 8, 8, 32, False,
                           [None, randn((24,))]))


def _two_op(x, w, bias, a_bits=8, even=False):
    """bfp_quantize of x then bfp_gemm: what bfp_act_linear fuses."""
    f = w.format
    k = x.shape[-1]
    m, e = torch.ops.llmcore.bfp_quantize(x.reshape(-1, k), a_bits, f.block_size, even)
    y = torch.ops.llmcore.bfp_gemm(m, e, w.mantissa, w.exponent, a_bits, f.mantissa_bits,
                                   f.block_size, k, bias, x.dtype)
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("fmt", ["mxint8", "mxint4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("k", [32, 97, 1025])
def test_bfp_act_linear_equals_quantize_then_gemm(fmt, dtype, m, k):
    """Bit for bit: the same quantisation and the same kernels, one call (the GEMV rows
    through per-thread scratch, more rows through the GEMM)."""
    n = 67
    x = randn((m, k), dtype)
    w = bfp_quantize(randn((n, k)), fmt)
    bias = randn((n,))
    for b in (None, bias):
        for even in (False, True):
            y = torch.ops.llmcore.bfp_act_linear(x, w.mantissa, w.exponent, 8,
                                                 w.format.mantissa_bits, 32, even, b)
            torch.testing.assert_close(y, _two_op(x, w, b, 8, even), rtol=0, atol=0)
    x3 = _noncontig((1, m, k), dtype)  # leading dims kept, strided x
    y3 = torch.ops.llmcore.bfp_act_linear(x3, w.mantissa, w.exponent, 8,
                                          w.format.mantissa_bits, 32, False, None)
    assert y3.shape == (1, m, n)
    torch.testing.assert_close(y3, _two_op(x3.contiguous(), w, None), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 5, 40])
def test_bfp_act_linears_share_one_quantisation(m):
    k = 96
    x = randn((1, m, k), torch.bfloat16)
    ws = [bfp_quantize(randn((n, k)), "mxint8") for n in (64, 16, 16)]
    bs = [None, randn((16,)), None]
    ys = bfp_act_linears(x, ws, bs, "mxint8")
    assert len(ys) == 3
    for y, w, b in zip(ys, ws, bs, strict=True):
        torch.testing.assert_close(y, _two_op(x, w, b), rtol=0, atol=0)
    # formats that differ: no single call
    assert bfp_act_linears(x, [ws[0], bfp_quantize(randn((8, k)), "mxint4")], [None, None],
                           "mxint8") is None
    with pytest.raises(ValueError, match="bias\\[1\\] must have shape"):
        torch.ops.llmcore.bfp_act_linear_multi(x, [w.mantissa for w in ws],
                                               [w.exponent for w in ws], 8, 8, 32, False,
                                               [None, randn((3,)), None])


def test_bfp_act_linear_reuses_scratch_across_shapes():
    """Per-thread scratch sized by the largest call so far: smaller and larger calls after
    each other still give the two-op result."""
    w_small = bfp_quantize(randn((33, 64)), "mxint8")
    w_big = bfp_quantize(randn((20, 2048)), "mxint4")
    for x, w in [(randn((16, 2048)), w_big), (randn((1, 64)), w_small),
                 (randn((3, 2048)), w_big), (randn((2, 64)), w_small)]:
        y = torch.ops.llmcore.bfp_act_linear(x, w.mantissa, w.exponent, 8,
                                             w.format.mantissa_bits, 32, False, None)
        torch.testing.assert_close(y, _two_op(x, w, None), rtol=0, atol=0)
    assert get_format("mxint4").block_size == 32


# ---- the model's fused inference path ------------------------------------------------------
def _decode(model, ids, storage="native"):
    """Logits of a prefill of all but the last 3 ids, then one token at a time."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1, storage=storage)
    out = [model(ids[:, :-3], cache=cache, prefill=True)]
    out += [model(ids[:, i:i + 1], cache=cache) for i in range(ids.shape[1] - 3, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [None, "mxint8", "mxint4"])
@pytest.mark.parametrize("storage", ["native", "mxint8"])
def test_model_fused_inference_equals_module_chain(dtype, quant, storage, monkeypatch):
    from llmcore.models import Transformer, TransformerConfig
    from llmcore.models import transformer as tf

    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("tiny", attention_bias=True)
    model = Transformer(cfg, dtype=dtype).eval()
    if quant:  # weight-only here: int8 activations (below) amplify a last-bit difference
        model.quantize(quant, act_format=None)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    calls, stacks = [], []
    real, real_stack = tf._add_rms_norm, tf.Transformer._decoder_layers
    monkeypatch.setattr(tf, "_add_rms_norm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(tf.Transformer, "_decoder_layers",
                        lambda *a: stacks.append(1) or real_stack(*a))
    with torch.inference_mode():
        fast = _decode(model, ids, storage)
        # the prefill through the Python chain (two per block), the 3 steps in one op each
        assert len(calls) == 2 * cfg.n_layers and len(stacks) == 3
        model.fused_inference = False
        chain = _decode(model, ids, storage)
        assert len(calls) == 2 * cfg.n_layers  # the module chain: no fused op
        model.fused_inference = True
        dense = model(ids)
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(fast, chain, rtol=tol, atol=tol)
    if storage == "native":  # an MXINT8 cache rounds k and v: only the cached runs agree
        torch.testing.assert_close(dense, chain, rtol=tol, atol=tol)


@pytest.mark.parametrize("quant", ["mxint8", "mxint4"])
def test_model_fused_inference_int8_activations(quant):
    """With int8 activations (quantize's default) a last-bit difference between the fused
    norm and the module chain can move one activation mantissa by a unit, so the two paths
    agree to that unit's size, not to rounding: about 1% of the logits' norm at most."""
    from llmcore.models import Transformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("tiny", attention_bias=True)
    model = Transformer(cfg).eval().quantize(quant)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.inference_mode():
        fast = _decode(model, ids)
        model.fused_inference = False
        chain = _decode(model, ids)
    assert fast.argmax(-1).eq(chain.argmax(-1)).float().mean() > 0.9
    assert ((fast - chain).norm() / chain.norm()).item() < 1e-2


def test_model_training_takes_the_module_chain(monkeypatch):
    """With gradients recorded (training, trainable BFP linears) nothing fused runs and
    autograd reaches every parameter."""
    from llmcore.models import Transformer, TransformerConfig
    from llmcore.nn import quantize_model

    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_name("tiny"))
    quantize_model(model, "mxint8", act_format="mxint8", trainable=True)
    monkeypatch.setattr(Transformer, "_hidden_fused", None)  # would raise if called
    ids = torch.randint(0, 256, (2, 9))
    model(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # a frozen copy for inference takes the fused path
        monkeypatch.undo()
        model(ids)


def test_fused_decode_step_compiles_to_one_graph():
    """The fused inference path (quantised linears, fused ops, append_attend) traces as
    one graph under torch.compile and gives the eager logits, without recompiling."""
    from llmcore.models import Transformer, TransformerConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Transformer(TransformerConfig.from_name("tiny")).eval().quantize("mxint8")
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        cache = m.new_cache(2, 32)
        m(ids[:, :8], cache=cache, prefill=True)
        want = [m(ids[:, i:i + 1], cache=cache) for i in range(8, 12)]
        cache.rollback(8)
        m.step = torch.compile(m.step, fullgraph=True, backend="aot_eager")
        got = [m(ids[:, 8:9], cache=cache)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            got += [m(ids[:, i:i + 1], cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_row_chunks_on_helper_threads(dtype):
    """Sizes that span several parallel chunks (the per-token ops hand rows to the helper
    threads of common/parallel.h, not to OpenMP): right at 2 threads, and the same bits as
    at 1 (each row is computed alone)."""
    x, d = randn((300, 1025), dtype), randn((300, 1025), dtype)
    w = randn((1025,), dtype)
    g, u = 4 * randn((3, 100_003), dtype), randn((3, 100_003), dtype)
    b, t, h, hd = 4, 300, 5, 64
    q, k = randn((b, t, h, hd), dtype), randn((b, t, 1, hd), dtype)
    pos = torch.randint(0, 4000, (b, t)).float()
    freqs = pos.unsqueeze(-1) / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def run():
        qq, kk = q.clone(), k.clone()
        fused.rope_(qq, kk, cos, sin)
        return (fused.rms_norm(x, w, 1e-5), *fused.add_rms_norm(x, d, w, 1e-6),
                fused.silu_mul(g, u), qq, kk)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, c in zip(one, two, strict=True):
        assert torch.equal(a, c)
    _close(two[0], ref.rms_norm(x, w, 1e-5), dtype, "rms_norm")
    _close(two[2], ref.add_rms_norm(x, d, w, 1e-6)[1], dtype, "add_rms_norm")
    _close(two[3], ref.silu_mul(g, u), dtype, "silu_mul")
    q_ref, k_ref = q.clone(), k.clone()
    ref.rope_(q_ref, k_ref, cos, sin)
    _close(two[4], q_ref, dtype, "rope q")
    _close(two[5], k_ref, dtype, "rope k")


# ---- greedy decoding's argmax ----------------------------------------------------------------
@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 16, 17, 1000, 32000])
def test_argmax_matches_torch(dtype, n, isa, monkeypatch):
    """The index of torch.argmax(x, -1) for every row: random rows, rows whose maximum
    appears twice (the first wins), NaNs (the first NaN wins), +-inf, and a
    non-contiguous view."""
    monkeypatch.setenv("LLMCORE_CPU_ISA", isa)
    x = randn((6, n), dtype)
    if n > 1:
        x[1, n // 3] = x[1, n - 1] = 50.0  # a tie: the first
        x[2, n - 1] = float("nan")
        x[2, n // 2] = float("nan")  # two NaNs: the first
        x[3, :] = float("-inf")  # all -inf: index 0
        x[4, n - 1] = float("inf")
        x[5] = x[5].round()  # many equal values
    want = x.argmax(-1)
    got = fused.argmax(x)
    assert got.dtype == torch.int64 and got.shape == (6,)
    assert torch.equal(got, want), (got, want)
    xt = randn((n, 3, 2), dtype).transpose(0, 2)  # [2, 3, n], strided
    assert torch.equal(torch.ops.llmcore.argmax_last(xt), xt.argmax(-1))


def test_argmax_shapes_errors_and_threads():
    x = randn((2, 5, 33))
    assert torch.equal(torch.ops.llmcore.argmax_last(x), x.argmax(-1))
    assert torch.ops.llmcore.argmax_last(torch.zeros(0, 9)).shape == (0,)
    assert torch.ops.llmcore.argmax_last(torch.tensor([3.0, 9.0, 1.0])).item() == 1
    with pytest.raises(ValueError, match="non-empty last axis"):
        torch.ops.llmcore.argmax_last(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        torch.ops.llmcore.argmax_last(torch.zeros(3, 4, dtype=torch.int32))
    big = randn((300, 4096))  # several of the helper threads' chunks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(torch.ops.llmcore.argmax_last(big), big.argmax(-1))
    finally:
        torch.set_num_threads(before)
    torch.library.opcheck(torch.ops.llmcore.argmax_last, (randn((2, 40)),))
    assert torch.equal(fused.argmax(torch.tensor([[1, 5, 2]])), torch.tensor([1]))  # ints: torch
