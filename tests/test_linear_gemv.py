"""llmcore::linear_gemv: the dense decode GEMV (x [..., K] of <= 16 rows @ weight[N, K]^T
+ bias), against the float64 product with an fp32-accumulation bound, on every CPU path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOAT_DTYPES, assert_equal_nan, assert_within, gemm_tol, randn

from llmcore import _ext
from llmcore import reference as ref
from llmcore.ops import linear_gemv
from llmcore.ops.dense import gemv_applies

pytestmark = pytest.mark.skipif(not _ext.has_kernel("linear_gemv", torch.device("cpu")),
                                reason="extension without the linear_gemv CPU kernel")


def _check(x, w, b, y, what=""):
    """y against the float64 product of the same (rounded) operands."""
    k = x.shape[-1]
    x64, w64 = x.reshape(-1, k).double(), w.double()
    want, tol = gemm_tol(x64, w64, x.dtype, None if b is None else b.double())
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_within(y.reshape(-1, w.shape[0]), want, tol, what)


@pytest.fixture(params=["best", "avx512-widen", "avx2", "scalar"])
def path(request, monkeypatch) -> str:
    """Every kernel path: the best (AVX512_BF16 dot products for bf16 where the CPU has
    them), AVX-512 widening bf16 to fp32 (CPUs without AVX512_BF16), AVX2 and scalar."""
    monkeypatch.delenv("LLMCORE_CPU_ISA", raising=False)
    monkeypatch.delenv("LLMCORE_CPU_BF16_DOT", raising=False)
    if request.param == "avx512-widen":
        monkeypatch.setenv("LLMCORE_CPU_BF16_DOT", "0")
    elif request.param in ("avx2", "scalar"):
        monkeypatch.setenv("LLMCORE_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("k,n", [(1, 7), (31, 33), (97, 5), (130, 77), (1025, 19)])
def test_matches_float64(path, dtype, m, k, n):
    x, w, b = randn((m, k), dtype), randn((n, k), dtype), randn((n,), dtype)
    _check(x, w, b, torch.ops.llmcore.linear_gemv(x, w, b), f"{path} bias")
    _check(x, w, None, torch.ops.llmcore.linear_gemv(x, w, None), f"{path} no bias")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_strided_inputs(path, dtype):
    """x non-contiguous with leading dims; the weight a slice of rows and columns of a
    larger matrix (any row stride, read in place); bias strided."""
    x = randn((3, 2, 200), dtype)[:, :, ::2]  # [3, 2, 100], stride 2 in K
    big = randn((90, 140), dtype)
    w = big[5:80:3, 20:120]  # [25, 100], row stride 420
    assert w.stride() == (420, 1)
    b = randn((50,), dtype)[::2]
    y = linear_gemv(x, w, b)
    assert y.shape == (3, 2, 25)
    _check(x, w, b, y, path)
    assert torch.equal(y, linear_gemv(x.contiguous(), w.contiguous(), b.contiguous()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_same_bits_on_any_thread_count(dtype):
    """Each output's sum order depends on M and K only: 1 and 2 threads agree bitwise
    (the weight is large enough to be split into many tasks)."""
    x, w, b = randn((5, 777), dtype), randn((901, 777), dtype), randn((901,), dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_gemv(x, w, b)
        torch.set_num_threads(2)
        two = linear_gemv(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_and_inf_propagate(path, dtype):
    x, w = randn((3, 70), dtype), randn((9, 70), dtype)
    x[0, 3] = float("nan")
    w[2, 69] = float("inf")  # the masked tail of the row
    w[4, 0] = float("-inf")
    y = linear_gemv(x, w)
    want = ref.linear_gemv(x, w)
    assert_equal_nan(torch.isnan(y), torch.isnan(want), path)
    inf = torch.isinf(want)
    assert inf.any() and torch.equal(y[inf], want[inf])


def test_empty():
    w = randn((6, 10), torch.bfloat16)
    assert linear_gemv(randn((0, 10), torch.bfloat16), w).shape == (0, 6)
    y = linear_gemv(randn((2, 10), torch.bfloat16), w[:0])
    assert y.shape == (2, 0) and y.dtype == torch.bfloat16
    b = randn((6,), torch.float32)
    y = linear_gemv(randn((2, 0), torch.float32), randn((6, 0), torch.float32), b)
    assert torch.equal(y, b.expand(2, 6))  # K = 0: the bias alone


def test_matches_f_linear_closely():
    """The module a model holds: within a couple of bf16 ulps of F.linear."""
    x, w, b = randn((4, 512), torch.bfloat16), randn((300, 512), torch.bfloat16), None
    torch.testing.assert_close(linear_gemv(x, w, b), F.linear(x, w, b), rtol=2e-2, atol=0.1)


@pytest.mark.parametrize("call", ["face", "op"])
def test_bad_inputs_name_the_argument(call):
    fn = linear_gemv if call == "face" else torch.ops.llmcore.linear_gemv
    x, w = randn((2, 8)), randn((4, 8))
    cases = [
        ((x.int(), w, None), "x must be float32"),
        ((randn((17, 8)), w, None), "x must have at most 16 rows"),
        ((randn((3, 6, 8)), w, None), "x must have at most 16 rows"),
        ((x, w.bfloat16(), None), "weight must"),
        ((x, randn((4, 9)), None), "weight must be"),
        ((x, randn((4, 8, 1)), None), "weight must"),
        ((x, w, randn((4,)).half()), "bias must"),
        ((x, w, randn((5,))), "bias must have shape"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(*args)
    with pytest.raises(ValueError, match="weight must be contiguous in its last dim"):
        torch.ops.llmcore.linear_gemv(x, randn((8, 4)).T, None)
    with pytest.raises(ValueError, match="weight must be on"):
        linear_gemv(x, w.to("meta"))


def test_applies_as_the_model_decides():
    x, w = randn((2, 8), torch.bfloat16), randn((4, 8), torch.bfloat16)
    assert gemv_applies(x, w, None)
    assert not gemv_applies(randn((17, 8), torch.bfloat16), w, None)
    assert not gemv_applies(x.float(), w, None)
    assert not gemv_applies(x, randn((8, 4), torch.bfloat16).T, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemv_applies(x, w, None)


def test_opcheck():
    for dtype in FLOAT_DTYPES:
        x, w, b = randn((3, 40), dtype), randn((24, 40), dtype), randn((24,), dtype)
        torch.library.opcheck(torch.ops.llmcore.linear_gemv, (x, w, b))
        torch.library.opcheck(torch.ops.llmcore.linear_gemv, (x.view(3, 1, 40), w, None))


def test_compiles():
    x, w = randn((2, 40), torch.bfloat16), randn((24, 40), torch.bfloat16)
    fn = torch.compile(lambda a, b: linear_gemv(a, b) * 2, fullgraph=True, backend="eager")
    assert torch.equal(fn(x, w), linear_gemv(x, w) * 2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_model_decode_matches_the_module_chain(dtype):
    """A dense model's cached steps (decode and a 5-token verify, the blocks in
    decoder_layers and the head in Python, all through linear_gemv) against the module
    chain (nn.Linear: F.linear), to the dtype's rounding."""
    from llmcore.models import Transformer, TransformerConfig

    cfg = TransformerConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=200,
                            vocab_size=257, max_seq_len=64, attention_bias=True)
    model = Transformer(cfg, dtype=dtype).eval()
    ids = torch.randint(0, 257, (2, 20))

    def run():
        cache = model.new_cache(2, 32)
        with torch.inference_mode():
            out = [model(ids[:, :9], cache=cache, prefill=True)[:, -1:]]
            out += [model(ids[:, i:i + 1], cache=cache) for i in range(9, 14)]
            out.append(model(ids[:, 14:19], cache=cache))
        return torch.cat(out, 1).float()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fast = run()
    calls = sum(e.count for e in prof.key_averages() if e.key == "llmcore::linear_gemv")
    assert calls == 6 * (2 * 7 + 1)  # 6 cached steps: 7 projections per layer and the head
    model.fused_inference = False
    chain = run()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(fast, chain, rtol=rtol, atol=rtol * chain.abs().max().item())
