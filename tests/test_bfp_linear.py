"""BFP linear layers (docs/bfp.md): weight-only ``bfp_linear`` and the activation-quantised
path / ``bfp_gemm``, against the float64 product of the exact operands from
llmcore.reference, with a bound tied to fp32 accumulation (see helpers.gemm_tol)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLOAT_DTYPES,
    PRESET_NAMES,
    assert_equal_nan,
    assert_within,
    gemm_tol,
    randn,
    randn_blocks,
)

from llmcore import ops
from llmcore import reference as ref
from llmcore.formats import BFPFormat, get_format
from llmcore.ops import BFPTensor

CUSTOM = [BFPFormat("c3b3", 3, 3), BFPFormat("c5b48", 5, 48), BFPFormat("c7b1", 7, 1)]
W_FORMATS = [get_format(n) for n in PRESET_NAMES] + CUSTOM
W_IDS = [f.name for f in W_FORMATS]


def make_weight(n: int, k: int, fmt, device, nan_at=()) -> BFPTensor:
    """A BFP weight [N, K] quantised by the reference (so these tests check the GEMM alone),
    with a different scale per block."""
    fmt = get_format(fmt)
    w = randn_blocks((n, k), fmt.block_size, torch.float32, "cpu", (-3.0, 3.0))
    for i, j in nan_at:
        w[i, j] = float("nan")
    m, e = ref.bfp_quantize(w, fmt.mantissa_bits, fmt.block_size)
    return BFPTensor(m, e, fmt, (n, k)).to(device)


def weight64(q: BFPTensor) -> torch.Tensor:
    f = q.format
    return ref.bfp_dequantize(q.mantissa.cpu(), q.exponent.cpu(), f.mantissa_bits, f.block_size,
                              q.shape[-1], torch.float64)


def check_weight_only(x, q, bias=None, y=None, what=""):
    """ops.bfp_linear(x, q, bias) vs reference.bfp_linear in float64."""
    if y is None:
        y = ops.bfp_linear(x, q, bias)
    n, k = q.shape
    assert y.dtype == x.dtype and y.device == x.device, (y.dtype, y.device)
    assert y.shape == (*x.shape[:-1], n)
    f = q.format
    x64 = x.detach().cpu().double().reshape(-1, k)
    b64 = None if bias is None else bias.detach().cpu().to(x.dtype).double()
    expected = ref.bfp_linear(x64, q.mantissa.cpu(), q.exponent.cpu(), f.mantissa_bits,
                              f.block_size, b64)
    _, tol = gemm_tol(x64, weight64(q), x.dtype, b64)
    assert_within(y.reshape(-1, n), expected, tol, what or f"bfp_linear {f.name} {x.dtype}")
    return y


def act_expected(x, q, act_fmt, rounding="nearest", bias=None):
    """(expected, tol) of the activation-quantised product: reference.bfp_gemm of the
    reference-quantised x and the weight, in float64."""
    af, wf = get_format(act_fmt), q.format
    n, k = q.shape
    x2 = x.detach().cpu().reshape(-1, k)
    am, ae = ref.bfp_quantize(x2, af.mantissa_bits, af.block_size, rounding == "even")
    a64 = ref.bfp_dequantize(am, ae, af.mantissa_bits, af.block_size, k, torch.float64)
    b64 = None if bias is None else bias.detach().cpu().float().double()
    if af.block_size == wf.block_size:
        expected = ref.bfp_gemm(am, ae, q.mantissa.cpu(), q.exponent.cpu(), af.mantissa_bits,
                                wf.mantissa_bits, wf.block_size, k, b64, torch.float64)
    else:
        expected = a64 @ weight64(q).T + (0 if b64 is None else b64)
    _, tol = gemm_tol(a64, weight64(q), x.dtype, b64)
    return expected, tol


def check_act(x, q, act_fmt, rounding="nearest", bias=None):
    y = ops.bfp_linear(x, q, bias, act_format=act_fmt, rounding=rounding)
    n, k = q.shape
    assert y.dtype == x.dtype and y.device == x.device and y.shape == (*x.shape[:-1], n)
    expected, tol = act_expected(x, q, act_fmt, rounding, bias)
    assert_within(y.reshape(-1, n), expected, tol,
                  f"bfp_linear act={get_format(act_fmt).name} w={q.format.name} {x.dtype}")
    return y


# ---------------------------------------------------------------------------------------
# weight-only
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("k", [1, 7, 32, 97, 1025])
@pytest.mark.parametrize("n", [1, 5, 64, 129])
def test_weight_only_shapes(m, k, n, device):
    q = make_weight(n, k, "mxint8", device)
    check_weight_only(randn((m, k), device=device), q)


@pytest.mark.parametrize("fmt", W_FORMATS, ids=W_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mkn", [(17, 97, 129), (1, 1025, 64), (64, 7, 5)], ids=str)
def test_weight_only_formats_dtypes(fmt, dtype, mkn, device):
    m, k, n = mkn
    q = make_weight(n, k, fmt, device)
    x = randn((m, k), dtype, device)
    check_weight_only(x, q)
    check_weight_only(x, q, randn((n,), dtype, device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5), (0,), (3, 0)], ids=str)
@pytest.mark.parametrize("name", ["mxint8", "mxint4"])
def test_weight_only_leading_dims_bias(dtype, lead, name, device):
    k, n = 97, 33
    q = make_weight(n, k, name, device)
    x = randn((*lead, k), dtype, device)
    y = check_weight_only(x, q, randn((n,), torch.float32, device))
    assert y.shape == (*lead, n)


@pytest.mark.parametrize("kind", ["transposed", "strided", "offset", "batch-permuted"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_weight_only_noncontiguous(kind, dtype, device):
    k, n = 97, 65
    q = make_weight(n, k, "mxint8", device)
    if kind == "transposed":
        x = randn((k, 9), dtype, device).T
    elif kind == "strided":
        x = randn((9, 2 * k), dtype, device)[:, ::2]
    elif kind == "offset":
        x = randn((10, k + 3), dtype, device)[1:, 2:k + 2]
    else:
        x = randn((3, 4, k), dtype, device).transpose(0, 1)
    assert not x.is_contiguous()
    bias = randn((2 * n,), dtype, device)[::2]
    y = check_weight_only(x, q, bias)
    assert torch.equal(y, ops.bfp_linear(x.contiguous(), q, bias.contiguous()))


@pytest.mark.parametrize("name", ["mxint8", "mxint4", "msfp16"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mkn", [(300, 97, 129), (513, 1025, 33)], ids=str)
def test_weight_only_large_m(name, dtype, mkn, device):
    m, k, n = mkn
    q = make_weight(n, k, name, device)
    check_weight_only(randn((m, k), dtype, device), q, randn((n,), dtype, device))


def test_weight_only_thread_count():
    q = make_weight(129, 1025, "mxint4", "cpu")
    x = randn((300, 1025))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        check_weight_only(x, q)
        check_act(x, q, "mxint4")
    finally:
        torch.set_num_threads(threads)


def test_weight_only_large_magnitudes(device):
    # weights across a wide exponent range per block; fp32 x with varied scales
    k, n = 257, 19
    w = randn_blocks((n, k), 32, torch.float32, "cpu", (-60, 60))
    m, e = ref.bfp_quantize(w, 8, 32)
    q = BFPTensor(m, e, "mxint8", (n, k)).to(device)
    x = randn_blocks((7, k), 32, torch.float32, device, (-40, 40))
    check_weight_only(x, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [3, 64])
def test_weight_only_small_weights_half_x(dtype, m, device):
    # Tiny weight scales with large fp16/bf16 activations: the products are normal fp16
    # numbers, but the weight values themselves are below fp16's normal range, so a kernel
    # that dequantises W to x's dtype before multiplying loses their low bits. The contract
    # is the product of x and the exact dequantised weight, accumulated in fp32.
    k, n = 97, 33
    w = randn_blocks((n, k), 32, torch.float32, "cpu", (-22, -16))
    mm, e = ref.bfp_quantize(w, 8, 32)
    q = BFPTensor(mm, e, "mxint8", (n, k)).to(device)
    x = randn_blocks((m, k), 32, dtype, device, (7, 9))
    check_weight_only(x, q)


@pytest.mark.parametrize("act", [None, "mxint8"])
@pytest.mark.parametrize("name", ["mxint8", "mxint4", "msfp12"])
def test_nan_weight_block(act, name, device):
    fmt = get_format(name)
    m_, k, n = 6, 3 * fmt.block_size + 5, 9
    # row 2: NaN in block 1; row 5: Inf in the partial last block
    q = make_weight(n, k, fmt, device, nan_at=[(2, fmt.block_size + 1), (5, k - 1)])
    x = randn((m_, k), device=device)
    if act is None or get_format(act).block_size == fmt.block_size:
        y = check_weight_only(x, q) if act is None else check_act(x, q, act)
    else:
        y = ops.bfp_linear(x, q, act_format=act)
    nan = torch.isnan(y.cpu())
    want = torch.zeros_like(nan)
    want[:, [2, 5]] = True
    assert torch.equal(nan, want), f"NaN pattern {nan.nonzero().tolist()}"


def test_nan_activation_row(device):
    k, n = 97, 11
    q = make_weight(n, k, "mxint8", device)
    x = randn((5, k), device=device)
    x[3, 40] = float("nan")
    for act in (None, "mxint8"):
        y = ops.bfp_linear(x, q, act_format=act).cpu()
        assert torch.isnan(y[3]).all() and not torch.isnan(y[[0, 1, 2, 4]]).any(), act


# ---------------------------------------------------------------------------------------
# activation-quantised
# ---------------------------------------------------------------------------------------
ACT_PAIRS = [
    ("mxint8", "mxint8"), ("mxint8", "mxint4"), ("mxint4", "mxint8"), ("mxint4", "mxint4"),
    ("msfp16", "msfp12"), ("msfp12", "msfp16"), ("bfp16", "bfp16"),
    ("msfp16", "mxint8"), ("mxint8", "bfp16"),  # different block sizes: dequantised fallback
]


@pytest.mark.parametrize("act,wname", ACT_PAIRS, ids=lambda p: str(p))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mkn", [(17, 97, 129), (1, 1025, 5), (64, 32, 64)], ids=str)
def test_act_quantized(act, wname, dtype, mkn, device):
    m, k, n = mkn
    q = make_weight(n, k, wname, device)
    x = randn_blocks((m, k), 32, dtype, device, (-4, 4))
    check_act(x, q, act)
    check_act(x, q, act, "even", bias=randn((n,), dtype, device))


@pytest.mark.parametrize("m", [1, 3, 16, 300])
@pytest.mark.parametrize("k", [1, 7, 33, 1025])
def test_act_quantized_shapes(m, k, device):
    n = 129 if m < 300 else 17
    q = make_weight(n, k, "mxint8", device)
    check_act(randn((m, k), device=device), q, "mxint8")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_act_quantized_leading_dims_noncontiguous(dtype, device):
    k, n = 97, 17
    q = make_weight(n, k, "msfp16", device)
    x = randn((3, 5, k), dtype, device).transpose(0, 1)
    y = check_act(x, q, "msfp16", bias=randn((n,), torch.float32, device))
    assert y.shape == (5, 3, n)


def test_act_custom_formats_same_block(device):
    a, w = BFPFormat("a6", 6, 48), BFPFormat("w3", 3, 48)
    q = make_weight(13, 150, w, device)
    check_act(randn((9, 150), device=device), q, a)
    check_act(randn((9, 150), device=device), q, w)


@pytest.mark.parametrize("a_name,b_name", [("mxint8", "mxint8"), ("mxint8", "mxint4"),
                                           ("msfp12", "msfp16"), ("bfp16", "bfp16")])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mkn", [(1, 1, 1), (17, 97, 129), (300, 1025, 7), (257, 64, 65)],
                         ids=str)
def test_bfp_gemm_op(a_name, b_name, out_dtype, mkn, device):
    m, k, n = mkn
    af, bf = get_format(a_name), get_format(b_name)
    assert af.block_size == bf.block_size
    a = make_weight(m, k, af, device)
    b = make_weight(n, k, bf, device)
    for bias in (None, randn((n,), torch.float32, device)):
        y = torch.ops.llmcore.bfp_gemm(a.mantissa, a.exponent, b.mantissa, b.exponent,
                                       af.mantissa_bits, bf.mantissa_bits, af.block_size, k,
                                       bias, out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n) and y.device == a.mantissa.device
        b64 = None if bias is None else bias.cpu().double()
        expected = ref.bfp_gemm(a.mantissa.cpu(), a.exponent.cpu(), b.mantissa.cpu(),
                                b.exponent.cpu(), af.mantissa_bits, bf.mantissa_bits,
                                af.block_size, k, b64, torch.float64)
        _, tol = gemm_tol(weight64(a), weight64(b), out_dtype, b64)
        assert_within(y, expected, tol, f"bfp_gemm {a_name}x{b_name} -> {out_dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bfp_linear_op_direct(dtype, device):
    k, n = 97, 33
    q = make_weight(n, k, "mxint4", device)
    x = randn((7, k), dtype, device)
    f = q.format
    for bias in (None, randn((n,), dtype, device)):
        y = torch.ops.llmcore.bfp_linear(x, q.mantissa, q.exponent, f.mantissa_bits,
                                         f.block_size, bias)
        check_weight_only(x, q, bias, y=y)


def test_cpu_isa_paths(cpu_isa):
    for name in ("mxint8", "mxint4", "msfp16", "bfp16"):
        for dtype in FLOAT_DTYPES:
            for m, k, n in ((1, 1025, 17), (17, 97, 129), (64, 7, 5)):
                q = make_weight(n, k, name, "cpu")
                x = randn((m, k), dtype)
                b = randn((n,), dtype)
                check_weight_only(x, q, b)
                check_weight_only(x.T.contiguous().T, q)
                check_act(x, q, name, bias=b)
    q = make_weight(17, 97, "mxint4", "cpu")
    check_act(randn((5, 97)), q, "mxint8", "even")
    q = make_weight(65, 161, "mxint8", "cpu")  # large M: the packed-panel GEMM paths
    x = randn((300, 161))
    check_weight_only(x, q)
    check_act(x, q, "mxint8")


# ---------------------------------------------------------------------------------------
# int8-activation decode GEMV (M <= 16, 8-bit activations, block 32): the CPU kernel that
# quantize() uses for inference by default
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512-cols", "avx512-steps"])
def gemv_isa(request, monkeypatch) -> str:
    """The decode GEMV's CPU paths: LLMCORE_CPU_ISA, and on AVX-512 both kernels for M > 1
    (LLMCORE_CPU_GEMV: the column tiles, the 256-byte steps; "avx512" keeps the default
    choice by weight format)."""
    isa, _, kernel = request.param.partition("-")
    flags = set(open("/proc/cpuinfo").read().split()) if isa != "scalar" else set()
    need = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl"}}
    if not need.get(isa, set()) <= flags:
        pytest.skip(f"CPU lacks {isa}")
    monkeypatch.setenv("LLMCORE_CPU_ISA", isa)
    if kernel:
        monkeypatch.setenv("LLMCORE_CPU_GEMV", kernel)
    return request.param


def act_error_bound(x, q):
    """The documented bound on |y(act_format="mxint8") - y(exact)| before fp32 rounding:
    sum over x's blocks of (the block's mantissa unit) * (sum of |W| over the block)."""
    n, k = q.shape
    x2 = x.detach().cpu().reshape(-1, k)
    _, ae = ref.bfp_quantize(x2, 8, 32)
    unit = ref.bfp_dequantize(torch.ones_like(x2, dtype=torch.int8), ae, 8, 32, k,
                              torch.float64)  # 2^(e - 6) per element
    return unit @ weight64(q).abs().T


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("k", [32, 61, 130, 1025, 2048])
def test_int8_act_gemv(wname, m, k, gemv_isa):
    n = 37
    q = make_weight(n, k, wname, "cpu")
    x = randn((m, k)) * torch.linspace(0.01, 100, k)  # block scales far apart
    b = randn((n,))
    y = check_act(x, q, "mxint8", bias=b)  # the same quantised math in float64
    exact = ops.bfp_linear(x, q, b)
    _, tol = gemm_tol(x.double(), weight64(q), torch.float32)
    err = (y - exact).double().abs()
    assert (err <= act_error_bound(x, q) + 2 * tol).all()


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
def test_int8_act_gemv_noncontiguous_and_dtypes(wname, gemv_isa):
    q = make_weight(33, 257, wname, "cpu")
    for dtype in FLOAT_DTYPES:
        x = randn((257, 5), dtype).T  # [5, 257], column-major
        check_act(x, q, "mxint8")
        check_act(randn((2, 3, 2 * 257), dtype)[..., ::2], q, "mxint8", "even")


def test_int8_act_gemv_nan_inf(gemv_isa):
    k, n = 100, 9
    q = make_weight(n, k, "mxint4", "cpu", nan_at=[(4, 70)])
    x = randn((3, k))
    x[1, 5] = float("inf")  # Inf in an activation block: that row's outputs are NaN
    y = ops.bfp_linear(x, q, act_format="mxint8")
    want = torch.zeros(3, n, dtype=torch.bool)
    want[1, :] = True
    want[:, 4] = True  # a NaN weight block: that column
    assert torch.equal(torch.isnan(y), want)


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
def test_int8_act_gemv_every_m(wname, gemv_isa):
    """M = 1..16 (row tiles of up to 8, split evenly), K that ends mid-chunk and mid-tile
    of scales (8-bit: 18 chunks of 64 bytes; 4-bit: 9), an odd N, and block exponents far
    apart."""
    k, n = 1100, 23
    q = make_weight(n, k, wname, "cpu")
    x = randn((16, k)) * torch.logspace(-3, 3, k)
    b = randn((n,))
    for m in range(1, 17):
        check_act(x[:m], q, "mxint8", bias=b)


def test_int8_act_gemv_nan_weight_scale(gemv_isa):
    """A weight block with exponent byte 255 (NaN) makes its output column NaN, at every
    row tile size; its neighbours stay finite."""
    k, n = 300, 7
    for wname in ("mxint8", "mxint4"):
        q = make_weight(n, k, wname, "cpu")
        q.exponent[3, 5] = 255
        for m in (1, 5, 9):
            y = ops.bfp_linear(randn((m, k)), q, act_format="mxint8")
            want = torch.zeros(m, n, dtype=torch.bool)
            want[:, 3] = True
            assert torch.equal(torch.isnan(y), want), (wname, m)


def test_int8_act_gemv_concurrent_callers():
    """Calls from several Python threads at once, with thread counts changing between calls
    (the helper threads serve one call at a time; the others run on their own thread)."""
    import threading

    q = make_weight(2053, 160, "mxint4", "cpu")
    xs = [randn((m, 160)) for m in (1, 3, 5, 16)]
    want = [ops.bfp_linear(x, q, act_format="mxint8") for x in xs]
    threads = torch.get_num_threads()
    errors = []

    def work(seed):
        for i in range(30):
            j = (seed + i) % len(xs)
            if not torch.equal(ops.bfp_linear(xs[j], q, act_format="mxint8"), want[j]):
                errors.append((seed, i))

    try:
        torch.set_num_threads(max(2, threads))
        ts = [threading.Thread(target=work, args=(s,)) for s in range(3)]
        for t in ts:
            t.start()
        for i in range(30):
            torch.set_num_threads(1 + i % 3)
            work(i)
        for t in ts:
            t.join()
    finally:
        torch.set_num_threads(threads)
    assert not errors


@pytest.mark.parametrize("n,k,fmt,m", [(4099, 96, "mxint8", 3),    # the decode GEMV (steps)
                                       (4099, 200, "mxint4", 5),   # (column tiles)
                                       (1000, 320, "mxint4", 100)])  # the prefill GEMM
def test_int8_act_threads(n, k, fmt, m):
    """1 and 2+ threads give the same bits (many column chunks)."""
    q = make_weight(n, k, fmt, "cpu")
    x = randn((m, k))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.bfp_linear(x, q, act_format="mxint8")
        torch.set_num_threads(max(2, threads))
        assert torch.equal(ops.bfp_linear(x, q, act_format="mxint8"), one)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# int8-activation prefill GEMM (M > 16, 8-bit activations, block 32): AMX tiles where the CPU
# has them (LLMCORE_CPU_ISA unset or "amx"), else the packed VNNI / AVX2 / scalar GEMM
# ---------------------------------------------------------------------------------------
def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return {"amx_tile", "amx_int8", "avx512bw"} <= set(flags)


PREFILL_ISAS = ["scalar", "avx2", "avx512",
                pytest.param("amx", marks=pytest.mark.skipif(not _has_amx(), reason="no AMX-INT8"))]


@pytest.fixture(params=PREFILL_ISAS)
def prefill_isa(request, monkeypatch) -> str:
    flags = set(open("/proc/cpuinfo").read().split()) if request.param != "scalar" else set()
    need = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl"}}
    if not need.get(request.param, set()) <= flags:
        pytest.skip(f"CPU lacks {request.param}")
    monkeypatch.setenv("LLMCORE_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
@pytest.mark.parametrize("m", [17, 31, 64, 129, 512])
def test_int8_act_prefill(wname, m, prefill_isa):
    for k, n in ((1000, 37), (97, 16), (64, 129)):  # K not a multiple of 64, odd N
        if prefill_isa == "scalar" and m * k * n > 3_000_000:
            continue
        q = make_weight(n, k, wname, "cpu")
        x = randn((m, k)) * torch.linspace(0.01, 100, k)  # block scales far apart
        b = randn((n,))
        check_act(x, q, "mxint8", bias=b)
        check_act(x, q, "mxint8")


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
def test_int8_act_prefill_noncontiguous_dtypes_nan(wname, prefill_isa):
    k, n = 161, 35
    q = make_weight(n, k, wname, "cpu", nan_at=[(7, 100)])
    clean = make_weight(n, k, wname, "cpu")
    for dtype in FLOAT_DTYPES:
        x = randn((k, 40), dtype).T  # [40, K], column-major
        x[3, 10] = float("inf")  # an Inf in an activation block: that row is NaN
        y = ops.bfp_linear(x, q, act_format="mxint8")
        want = torch.zeros(40, n, dtype=torch.bool)
        want[3, :] = True
        want[:, 7] = True  # a NaN weight block: that column
        assert torch.equal(torch.isnan(y), want)
        expected, tol = act_expected(x, q, "mxint8")
        assert_within(y, expected, tol, f"prefill {wname} {dtype}")
        check_act(randn((2, 20, 2 * k), dtype)[..., ::2], clean, "mxint8", "even")


# ---------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(7,), (2, 3)], ids=str)
@pytest.mark.parametrize("name", ["mxint8", "mxint4"])
def test_weight_only_gradients(dtype, lead, name, device):
    k, n = 97, 33
    q = make_weight(n, k, name, device)
    x = randn((*lead, k), dtype, device).requires_grad_()
    bias = randn((n,), dtype, device).requires_grad_()
    y = ops.bfp_linear(x, q, bias)
    g = randn(y.shape, dtype, device)
    y.backward(g)
    assert x.grad is not None and bias.grad is not None
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype

    # autograd of F.linear with the dequantised weight, in float64
    w64 = weight64(q)
    x64 = x.detach().cpu().double().requires_grad_()
    b64 = bias.detach().cpu().double().requires_grad_()
    F.linear(x64, w64, b64).backward(g.cpu().double())
    g64 = g.cpu().double().reshape(-1, n)
    _, tol_x = gemm_tol(g64, w64.T.contiguous(), dtype)
    assert_within(x.grad.reshape(-1, k), x64.grad.reshape(-1, k), tol_x, "grad x")
    _, tol_b = gemm_tol(torch.ones(1, g64.shape[0], dtype=torch.float64), g64.T.contiguous(),
                        dtype)
    assert_within(bias.grad, b64.grad, tol_b[0], "grad bias")


@pytest.mark.parametrize("act", ["mxint8", "msfp16"])  # same block size as the weight / not
def test_act_quantized_gradients(act, device):
    # The docstring: "Differentiable with respect to x and bias". The bias enters linearly,
    # so its gradient is exact; for x, the gradient passes straight through the rounding of
    # x (the MX training recipe, docs/bfp.md): dx = dy @ dequant(W).
    k, n = 64, 9
    q = make_weight(n, k, "mxint8", device)
    x = randn((5, k), device=device).requires_grad_()
    bias = randn((n,), device=device).requires_grad_()
    y = ops.bfp_linear(x, q, bias, act_format=act)
    g = randn(y.shape, device=device)
    y.backward(g)
    assert bias.grad is not None, "no gradient reached bias on the activation-quantised path"
    g64 = g.cpu().double()
    _, tol_b = gemm_tol(torch.ones(1, 5, dtype=torch.float64), g64.T.contiguous(),
                        torch.float32)
    assert_within(bias.grad, g64.sum(0), tol_b[0], "grad bias")
    assert x.grad is not None, "no gradient reached x on the activation-quantised path"
    w64 = weight64(q)
    _, tol_x = gemm_tol(g64, w64.T.contiguous(), torch.float32)
    assert_within(x.grad, g64 @ w64, tol_x, "grad x (straight-through)")


def test_gradient_bias_only_and_x_only(device):
    q = make_weight(5, 33, "mxint8", device)
    x = randn((4, 33), device=device)
    b = randn((5,), device=device).requires_grad_()
    ops.bfp_linear(x, q, b).sum().backward()
    assert torch.equal(b.grad.cpu(), torch.full((5,), 4.0))
    xr = x.clone().requires_grad_()
    ops.bfp_linear(xr, q).sum().backward()
    expected = weight64(q).sum(0).expand(4, 33)
    assert_within(xr.grad, expected, 8 * 6 * 2.0**-24 * weight64(q).abs().sum(0).expand(4, 33))


# ---------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------
def _opcheck_samples(device):
    q8 = make_weight(5, 40, "mxint8", device)
    q4 = make_weight(6, 40, "mxint4", device)
    x = randn((3, 40), device=device)
    a8 = make_weight(3, 40, "mxint8", device)
    return {
        "bfp_quantize": [(x, 8, 32, False), (randn((2, 3, 7), torch.bfloat16, device), 4, 16,
                                             True)],
        "bfp_dequantize": [(q8.mantissa, q8.exponent, 8, 32, 40, torch.float32),
                           (q4.mantissa, q4.exponent, 4, 32, 40, torch.bfloat16)],
        "bfp_linear": [
            (x.clone().requires_grad_(), q8.mantissa, q8.exponent, 8, 32,
             randn((5,), device=device).requires_grad_()),
            (randn((2, 40), torch.float16, device), q4.mantissa, q4.exponent, 4, 32, None),
        ],
        "bfp_gemm": [(a8.mantissa, a8.exponent, q4.mantissa, q4.exponent, 8, 4, 32, 40, None,
                      torch.float32),
                     (a8.mantissa, a8.exponent, q8.mantissa, q8.exponent, 8, 8, 32, 40,
                      randn((5,), device=device), torch.bfloat16)],
    }


@pytest.mark.parametrize("op", ["bfp_quantize", "bfp_dequantize", "bfp_linear", "bfp_gemm"])
def test_opcheck(op, device):
    for args in _opcheck_samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.llmcore, op).default, args,
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    k, n = 97, 33
    q = make_weight(n, k, "mxint8", device)
    bias = randn((n,), device=device)

    def f(x):
        return ops.bfp_linear(x, q, bias) * 2

    x = randn((5, k), device=device)
    compiled = torch.compile(f, fullgraph=True)
    assert_equal_nan(compiled(x), f(x), "compiled weight-only")
    x2 = randn((9, k), device=device)  # a second shape
    assert_equal_nan(compiled(x2), f(x2), "compiled weight-only, new shape")


def test_torch_compile_fullgraph_act_quantized(device):
    torch._dynamo.reset()
    q = make_weight(17, 64, "mxint4", device)

    def f(x):
        return ops.bfp_linear(x, q, act_format="mxint8")

    x = randn((3, 64), device=device)
    compiled = torch.compile(f, fullgraph=True)
    assert_equal_nan(compiled(x), f(x), "compiled act-quantised")
