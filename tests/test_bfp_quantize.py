"""BFP quantisation and dequantisation (docs/formats.md): bit-exact against the reference
in llmcore.reference.bfp, plus hand-computed expectations for ties, saturation, zeros,
subnormals, NaN/Inf blocks and the packed 4-bit layout."""

import math

import pytest
import torch
from helpers import FLOAT_DTYPES, PRESET_NAMES, assert_equal_nan, randn_blocks

from llmcore import _ext, ops
from llmcore import reference as ref
from llmcore.formats import BFPFormat, get_format
from llmcore.ops import BFPTensor

CUSTOM = [BFPFormat("c2b1", 2, 1), BFPFormat("c3b3", 3, 3), BFPFormat("c5b48", 5, 48),
          BFPFormat("c7b3", 7, 3)]
ALL_FORMATS = [get_format(n) for n in PRESET_NAMES] + CUSTOM
FMT_IDS = [f.name for f in ALL_FORMATS]
BFP_OPS = ["bfp_quantize", "bfp_dequantize", "bfp_linear", "bfp_gemm"]


def _unpack(p: torch.Tensor, k: int) -> torch.Tensor:
    """Hand-written nibble unpacking (low nibble = even element), independent of the
    reference's."""
    p = p.to(torch.int16)
    out = torch.empty(*p.shape[:-1], 2 * p.shape[-1], dtype=torch.int16)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = (p >> 4) & 0xF
    out = torch.where(out >= 8, out - 16, out)
    return out[..., :k]


def mantissas(q: BFPTensor) -> torch.Tensor:
    """Logical int mantissas [..., K] of q (unpacked for 4-bit formats), on the CPU."""
    m = q.mantissa.cpu()
    return _unpack(m, q.shape[-1]) if q.format.packed else m.to(torch.int16)


def check_quantize(x: torch.Tensor, fmt: BFPFormat, rounding: str = "nearest") -> BFPTensor:
    """Quantise with the op and require bit-exact agreement with the reference; also the
    dequantisation to every float dtype."""
    q = ops.bfp_quantize(x, fmt, rounding)
    k = x.shape[-1]
    assert q.shape == x.shape and q.dtype == x.dtype and q.format == fmt
    assert q.mantissa.device == x.device and q.exponent.device == x.device
    assert q.mantissa.dtype == (torch.uint8 if fmt.packed else torch.int8)
    assert q.exponent.dtype == torch.uint8
    assert tuple(q.mantissa.shape) == (*x.shape[:-1], fmt.mantissa_cols(k))
    assert tuple(q.exponent.shape) == (*x.shape[:-1], fmt.exponent_cols(k))
    m_ref, e_ref = ref.bfp_quantize(x.cpu(), fmt.mantissa_bits, fmt.block_size,
                                    rounding == "even")
    e = q.exponent.cpu()
    if not torch.equal(e, e_ref):
        bad = (e != e_ref).nonzero()[:5].tolist()
        raise AssertionError(f"{fmt.name} {rounding} {x.dtype}: exponent differs from the "
                             f"reference at {bad}: got {[e[tuple(i)].item() for i in bad]}, "
                             f"expected {[e_ref[tuple(i)].item() for i in bad]}")
    m = q.mantissa.cpu()
    if not torch.equal(m, m_ref):
        mu = mantissas(q)
        mr = _unpack(m_ref, k) if fmt.packed else m_ref.to(torch.int16)
        bad = (mu != mr).nonzero()[:5].tolist()
        xs = x.cpu()
        raise AssertionError(
            f"{fmt.name} {rounding} {x.dtype}: mantissa differs from the reference at {bad}: "
            f"x={[xs[tuple(i)].item() for i in bad]} got {[mu[tuple(i)].item() for i in bad]}, "
            f"expected {[mr[tuple(i)].item() for i in bad]} (packed bytes equal elementwise: "
            f"{torch.equal(mu, mr)})")
    return q


def check_dequantize(q: BFPTensor, dtype: torch.dtype) -> torch.Tensor:
    y = ops.bfp_dequantize(q, dtype)
    f = q.format
    y_ref = ref.bfp_dequantize(q.mantissa.cpu(), q.exponent.cpu(), f.mantissa_bits,
                               f.block_size, q.shape[-1], dtype)
    assert y.device == q.device
    assert_equal_nan(y, y_ref, f"dequantize {f.name} -> {dtype}")
    return y


# ---------------------------------------------------------------------------------------
# registration: guards against the ops silently taking the reference path
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", BFP_OPS)
def test_kernels_registered(op, device):
    assert _ext.available(), f"llmcore._C failed to load: {_ext.LOAD_ERROR}"
    assert _ext.has_kernel(op, device), (
        f"torch.ops.llmcore.{op} has no {device.type} kernel: the extension was built "
        "without it and the ops fall back to the reference")


# ---------------------------------------------------------------------------------------
# random inputs vs the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 33, 97, 1025])
def test_quantize_matches_reference(fmt, dtype, k, device):
    x = randn_blocks((3, k), fmt.block_size, dtype, device)
    for rounding in ("nearest", "even"):
        check_quantize(x, fmt, rounding)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
def test_quantize_full_fp32_range(fmt, device):
    # per-block scales across the whole fp32 range, incl. subnormal-only blocks
    x = randn_blocks((4, 7 * fmt.block_size + 3), fmt.block_size, torch.float32, device,
                     log2_range=(-149.0, 126.0))
    assert torch.isfinite(x).all()
    check_quantize(x, fmt)
    check_quantize(x, fmt, "even")


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
def test_quantize_wide_range_within_block(fmt, device):
    # magnitudes 1e-30..1e30 elementwise: small elements share a block with huge ones
    k = 4 * fmt.block_size + 1
    x = torch.randn(5, k) * torch.exp2(torch.empty(5, k).uniform_(-100, 100))
    x = torch.where(x == 0, 1.0, x).to(device)
    check_quantize(x, fmt)
    check_quantize(x, fmt, "even")


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("shape", [(2, 3, 97), (0, 33), (4, 0, 7), (1, 1, 1, 40), (0,  1)],
                         ids=str)
def test_quantize_leading_dims(name, shape, device):
    fmt = get_format(name)
    x = randn_blocks(shape, fmt.block_size, torch.float32, device) if 0 not in shape \
        else torch.randn(shape, device=device)
    q = check_quantize(x, fmt)
    y = check_dequantize(q, torch.float32)
    assert y.shape == x.shape


def _noncontiguous(kind: str, k: int, dtype, device) -> torch.Tensor:
    if kind == "transposed":  # last-axis stride != 1
        x = randn_blocks((6, k), 8, dtype, device, (-20, 10)).T.contiguous().T
    elif kind == "strided":
        x = randn_blocks((5, 2 * k), 8, dtype, device, (-20, 10))[:, ::2]
    elif kind == "offset":
        x = randn_blocks((5, k + 3), 8, dtype, device, (-20, 10))[1:, 2:k + 2]
    elif kind == "permuted":
        x = randn_blocks((k, 3, 4), 8, dtype, device, (-20, 10)).permute(2, 1, 0)
    elif kind == "expanded":
        x = randn_blocks((1, k), 8, dtype, device, (-20, 10)).expand(4, k)
    else:
        raise AssertionError(kind)
    assert not x.is_contiguous() or kind == "expanded"
    return x


@pytest.mark.parametrize("kind", ["transposed", "strided", "offset", "permuted", "expanded"])
@pytest.mark.parametrize("name", ["mxint8", "mxint4", "bfp16"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_noncontiguous(kind, name, dtype, device):
    x = _noncontiguous(kind, 97, dtype, device)
    fmt = get_format(name)
    q = check_quantize(x, fmt)
    # same bits as the contiguous copy
    qc = ops.bfp_quantize(x.contiguous(), fmt)
    assert torch.equal(q.mantissa.cpu(), qc.mantissa.cpu())
    assert torch.equal(q.exponent.cpu(), qc.exponent.cpu())


# ---------------------------------------------------------------------------------------
# hand-computed expectations
# ---------------------------------------------------------------------------------------
# (x * 2^(b-2) in a block whose amax is in [1, 2) so e = 0, nearest, even)
TIES_8BIT = [
    (64.0, 64, 64),  # 1.0: fixes the block exponent at 0
    (0.5, 1, 0), (-0.5, -1, 0), (1.5, 2, 2), (-1.5, -2, -2), (2.5, 3, 2), (-2.5, -3, -2),
    (3.5, 4, 4), (5.5, 6, 6), (6.5, 7, 6), (-6.5, -7, -6), (62.5, 63, 62), (-63.5, -64, -64),
    (100.5, 101, 100), (126.5, 127, 126), (-126.5, -127, -126),
    (127.5, 127, 127), (-127.5, -127, -127),  # ties that saturate
    (0.25, 0, 0), (0.75, 1, 1), (-0.75, -1, -1), (9.0, 9, 9), (-33.0, -33, -33),
    (20.5, 21, 20), (21.5, 22, 22), (-20.5, -21, -20), (-21.5, -22, -22),
    (40.25, 40, 40), (40.75, 41, 41), (11.5, 12, 12), (12.5, 13, 12), (-0.25, 0, 0),
]
# fp32 only: one ulp either side of a tie (the x + 0.5 trick gets the first one wrong)
NEAR_TIES_8BIT = [
    (64.0, 64, 64),
    (0.5 - 2**-25, 0, 0), (-(0.5 - 2**-25), 0, 0), (0.5 + 2**-24, 1, 1),
    (2.5 - 2**-22, 2, 2), (2.5 + 2**-22, 3, 3), (-(2.5 + 2**-22), -3, -3),
    (126.5 - 2**-17, 126, 126), (126.5 + 2**-17, 127, 127), (1.5 - 2**-23, 1, 1),
    (127.5 - 2**-17, 127, 127), (63.5 + 2**-18, 64, 64), (63.5 - 2**-18, 63, 63),
]
TIES_4BIT = [  # b = 4: x * 4
    (4.0, 4, 4), (0.5, 1, 0), (-0.5, -1, 0), (1.5, 2, 2), (2.5, 3, 2), (-2.5, -3, -2),
    (3.5, 4, 4), (4.5, 5, 4), (5.5, 6, 6), (6.5, 7, 6), (-6.5, -7, -6), (7.5, 7, 7),
    (-7.5, -7, -7), (0.25, 0, 0), (0.75, 1, 1), (-1.5, -2, -2),
]


def _tie_block(table, bits: int, scale_exp: int, dtype, device):
    v = torch.tensor([t[0] for t in table], dtype=torch.float64)
    x = v * 2.0 ** (-(bits - 2) + scale_exp)
    xt = x.to(dtype)
    assert torch.equal(xt.double(), x), "tie value not representable in this dtype"
    return xt.to(device), [t[1] for t in table], [t[2] for t in table]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("scale_exp", [-90, -13, 0, 1, 7, 90])
@pytest.mark.parametrize("rounding", ["nearest", "even"])
def test_ties_8bit_by_hand(dtype, scale_exp, rounding, device):
    if dtype == torch.float16 and not -8 <= scale_exp <= 7:
        pytest.skip("outside fp16's range")
    fmt = BFPFormat("t8", 8, len(TIES_8BIT))
    x, nearest, even = _tie_block(TIES_8BIT, 8, scale_exp, dtype, device)
    q = check_quantize(x, fmt, rounding)
    assert q.exponent.cpu().tolist() == [127 + scale_exp]
    assert mantissas(q).tolist() == (nearest if rounding == "nearest" else even)


@pytest.mark.parametrize("scale_exp", [-60, 0, 60])
@pytest.mark.parametrize("rounding", ["nearest", "even"])
def test_near_ties_8bit_by_hand(scale_exp, rounding, device):
    x, nearest, even = _tie_block(NEAR_TIES_8BIT, 8, scale_exp, torch.float32, device)
    fmt = BFPFormat("t8", 8, 16)  # 13 elements: one partial block
    q = check_quantize(x, fmt, rounding)
    assert q.exponent.cpu().tolist() == [127 + scale_exp]
    assert mantissas(q).tolist() == (nearest if rounding == "nearest" else even)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("scale_exp", [-40, -3, 0, 5])
@pytest.mark.parametrize("rounding", ["nearest", "even"])
def test_ties_4bit_by_hand(dtype, scale_exp, rounding, device):
    if dtype == torch.float16 and scale_exp < -10:
        pytest.skip("outside fp16's range")
    fmt = get_format("msfp12")  # 4 bits, block 16 == len(TIES_4BIT)
    x, nearest, even = _tie_block(TIES_4BIT, 4, scale_exp, dtype, device)
    x = torch.cat([x, x.flip(0)])  # two blocks
    q = check_quantize(x, fmt, rounding)
    assert q.exponent.cpu().tolist() == [127 + scale_exp] * 2
    want = nearest if rounding == "nearest" else even
    assert mantissas(q).tolist() == want + want[::-1]


@pytest.mark.parametrize("rounding", ["nearest", "even"])
def test_ties_2bit_by_hand(rounding, device):
    # b = 2: m = round(x * 2^-e) clamped to [-1, 1]; blocks of 4 with e = 0 and e = 1
    # (second block: x * 2^-1 = [1.5, 0.75, -0.75, 0.5])
    x = torch.tensor([1.0, 0.5, -0.5, 0.25, 3.0, 1.5, -1.5, 1.0], device=device)
    q = check_quantize(x, BFPFormat("b2", 2, 4), rounding)
    assert q.exponent.cpu().tolist() == [127, 128]
    if rounding == "nearest":
        assert mantissas(q).tolist() == [1, 1, -1, 0, 1, 1, -1, 1]
    else:
        assert mantissas(q).tolist() == [1, 0, 0, 0, 1, 1, -1, 0]


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("e", [-126, -100, -1, 0, 5, 100, 127])
@pytest.mark.parametrize("frac", [1.999, 2 - 2**-23, 1 + 2**-23, 1.0])
def test_saturation_by_hand(name, e, frac, device):
    fmt = get_format(name)
    b = fmt.mantissa_bits
    lim = fmt.max_mantissa
    k = fmt.block_size
    big = frac * 2.0**e
    rest = torch.rand(k - 2, dtype=torch.float64) * 0.9 * big + 2.0**(e - 3)
    x = torch.cat([torch.tensor([big, -big], dtype=torch.float64), rest]).float()
    assert x[0].item() == pytest.approx(big, rel=2**-23)
    x = torch.stack([x, -x]).to(device)
    q = check_quantize(x, fmt)
    assert q.exponent.cpu().tolist() == [[127 + e], [127 + e]]
    m = mantissas(q)
    want = min(lim, math.floor(frac * 2 ** (b - 2) + 0.5))
    assert m[0, :2].tolist() == [want, -want]
    assert m[1, :2].tolist() == [-want, want]
    assert m.abs().max().item() <= lim


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
def test_all_zero_blocks(fmt, device):
    k = 3 * fmt.block_size + 1
    x = randn_blocks((2, k), fmt.block_size, torch.float32, "cpu", (-10, 10))
    x[0, :fmt.block_size] = 0.0
    x[1, fmt.block_size:2 * fmt.block_size] = -0.0
    x[1, 3 * fmt.block_size:] = 0.0  # the partial last block
    q = check_quantize(x.to(device), fmt)
    e = q.exponent.cpu()
    assert e[0, 0].item() == 0 and e[1, 1].item() == 0 and e[1, 3].item() == 0
    m = mantissas(q)
    assert (m[0, :fmt.block_size] == 0).all()
    assert (m[1, fmt.block_size:2 * fmt.block_size] == 0).all()
    y = check_dequantize(q, torch.float32)
    assert (y.cpu()[0, :fmt.block_size] == 0).all()
    # a block that is zero everywhere
    z = torch.zeros(3, k, device=device)
    qz = check_quantize(z, fmt)
    assert (qz.exponent.cpu() == 0).all() and (qz.mantissa.cpu() == 0).all()
    assert (check_dequantize(qz, torch.bfloat16).cpu() == 0).all()


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_subnormals(fmt, dtype, device):
    k = 4 * fmt.block_size
    tiny = torch.finfo(dtype).smallest_normal
    x = torch.rand(3, k, dtype=torch.float64) * tiny * torch.exp2(
        -torch.randint(0, 10, (3, k)).double())
    x = torch.where(torch.rand(3, k) < 0.5, -x, x).to(dtype)
    x = torch.where(x == 0, tiny / 4, x)
    assert (x.abs() < tiny).any()
    check_quantize(x.to(device), fmt)
    check_quantize(x.to(device), fmt, "even")


def test_subnormals_by_hand(device):
    fmt = BFPFormat("b8x4", 8, 4)
    x = torch.tensor([
        [1.5 * 2.0**-127] * 4,  # subnormal amax: e = -127, m = 1.5 * 64
        [2.0**-126, 2.0**-127, 2.0**-133, -(2.0**-126)],  # smallest normal: e = -126
        [2.0**-130, 2.0**-149, -(2.0**-130), 2.0**-131],  # e = -127: m = 8, 0, -8, 4
        [2.0**-149, 0.0, 0.0, 0.0],  # v = 2^-16 -> 0
    ], dtype=torch.float64).float().to(device)
    q = check_quantize(x, fmt)
    assert q.exponent.cpu().flatten().tolist() == [0, 1, 0, 0]
    assert mantissas(q).tolist() == [[96] * 4, [64, 32, 1, -64], [8, 0, -8, 4], [0, 0, 0, 0]]
    y = check_dequantize(q, torch.float32)
    assert y.cpu()[0].tolist() == [1.5 * 2.0**-127] * 4
    assert y.cpu()[2].tolist() == [2.0**-130, 0.0, -(2.0**-130), 2.0**-131]


@pytest.mark.parametrize("fmt", [get_format("mxint8"), get_format("mxint4"),
                                 get_format("bfp16"), CUSTOM[1]], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_inf_blocks(fmt, dtype, device):
    B = fmt.block_size
    k = 5 * B + 1  # blocks 0..4 full, block 5 partial (one element)
    x = randn_blocks((3, k), B, dtype, "cpu", (-10, 10))
    bad = x.clone()
    bad[0, B + B // 2] = float("nan")  # block 1
    bad[0, 2 * B] = float("inf")  # block 2, first element
    bad[0, 4 * B - 1] = float("-inf")  # block 3, last element
    bad[1, 5 * B] = float("nan")  # the partial last block
    bad[2, :] = float("nan")  # everything
    q = check_quantize(bad.to(device), fmt)
    e = q.exponent.cpu()
    assert e[0].tolist()[1:4] == [255, 255, 255] and 255 not in (e[0, 0].item(), e[0, 4].item())
    assert e[1, 5].item() == 255 and (e[1, :5] != 255).all()
    assert (e[2] == 255).all()
    # neighbouring blocks are exactly as without the NaN/Inf
    q_clean = ops.bfp_quantize(x.to(device), fmt)
    ec = q_clean.exponent.cpu()
    assert e[0, 0] == ec[0, 0] and e[0, 4] == ec[0, 4] and e[0, 5] == ec[0, 5]
    assert torch.equal(e[1, :5], ec[1, :5])
    m, mc = mantissas(q), mantissas(q_clean)
    assert torch.equal(m[0, :B], mc[0, :B]) and torch.equal(m[0, 4 * B:], mc[0, 4 * B:])
    assert torch.equal(m[1, :5 * B], mc[1, :5 * B])
    for out in FLOAT_DTYPES:
        y = check_dequantize(q, out).cpu()
        assert torch.isnan(y[0, B:4 * B]).all() and not torch.isnan(y[0, :B]).any()
        assert not torch.isnan(y[0, 4 * B:]).any()
        assert torch.isnan(y[1, 5 * B]) and not torch.isnan(y[1, :5 * B]).any()
        assert torch.isnan(y[2]).all()


def test_packed_layout_by_hand(device):
    fmt = get_format("mxint4")  # b = 4: m = round(x * 4) for a block with amax in [1, 2)
    x = torch.tensor([[1.0, -0.5, 0.25], [1.75, -1.75, 0.5]], device=device)
    q = check_quantize(x, fmt)
    assert q.mantissa.dtype == torch.uint8 and q.mantissa.shape == (2, 2)
    # row 0: m = [4, -2, 1] -> bytes [0x4 | 0xE << 4, 0x1 | 0x0 << 4] (padding nibble 0)
    # row 1: m = [7, -7, 2] -> bytes [0x7 | 0x9 << 4, 0x2]
    assert q.mantissa.cpu().tolist() == [[0xE4, 0x01], [0x97, 0x02]]
    assert q.exponent.cpu().tolist() == [[127], [127]]
    x4 = torch.tensor([1.75, -1.75, 0.5, -0.25, -1.0, 0.75], device=device)
    q4 = check_quantize(x4, fmt)  # m = [7, -7, 2, -1, -4, 3]
    assert q4.mantissa.cpu().tolist() == [0x97, 0xF2, 0x3C]
    y = check_dequantize(q4, torch.float32)
    assert y.cpu().tolist() == [1.75, -1.75, 0.5, -0.25, -1.0, 0.75]


# ---------------------------------------------------------------------------------------
# dequantisation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 97, 1025])
def test_dequantize_matches_reference(fmt, out_dtype, k, device):
    x = randn_blocks((3, k), fmt.block_size, torch.float32, "cpu", (-140, 125))
    m, e = ref.bfp_quantize(x, fmt.mantissa_bits, fmt.block_size)
    q = BFPTensor(m, e, fmt, x.shape).to(device)
    y = check_dequantize(q, out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_dequantize_arbitrary_bytes(fmt, out_dtype, device):
    # every exponent byte (0..255, 255 = NaN) and every legal mantissa
    k = 2 * fmt.block_size + 5
    nb = fmt.exponent_cols(k)
    e = torch.randint(0, 256, (256 // nb + 1, nb), dtype=torch.int32)
    e[0] = 0
    e[1] = 254
    e.view(-1)[:256] = torch.arange(256, dtype=torch.int32)
    e = e.to(torch.uint8)
    lim = fmt.max_mantissa
    m = torch.randint(-lim, lim + 1, (e.shape[0], k), dtype=torch.int8)
    m = ref.pack_nibbles(m) if fmt.packed else m
    q = BFPTensor(m, e, fmt, (e.shape[0], k)).to(device)
    check_dequantize(q, out_dtype)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_default_dequantize_dtype(fmt, dtype, device):
    x = randn_blocks((2, 40), fmt.block_size, dtype, device, (-10, 10))
    q = ops.bfp_quantize(x, fmt)
    y = q.dequantize()
    assert y.dtype == dtype and y.shape == x.shape
    assert_equal_nan(y, ops.bfp_dequantize(q, dtype))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("k", [1, 7, 97, 1025])
@pytest.mark.parametrize("rounding", ["nearest", "even"])
def test_quantize_dequantize_idempotent(fmt, k, rounding, device):
    x = randn_blocks((4, k), fmt.block_size, torch.float32, device, (-130, 120))
    x[0, 0] = float("nan")
    q = ops.bfp_quantize(x, fmt, rounding)
    y = ops.bfp_dequantize(q, torch.float32)
    q2 = ops.bfp_quantize(y, fmt, rounding)
    assert torch.equal(q2.exponent.cpu(), q.exponent.cpu())
    assert torch.equal(q2.mantissa.cpu(), q.mantissa.cpu())
    assert_equal_nan(ops.bfp_dequantize(q2, torch.float32), y)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
def test_quantisation_error_bound(fmt, device):
    # |x - deq(q(x))| <= half a step 2^(e-(b-2)) per element, unless saturated
    x = randn_blocks((6, 5 * fmt.block_size), fmt.block_size, torch.float32, device, (-50, 50))
    q = ops.bfp_quantize(x, fmt)
    y = ops.bfp_dequantize(q, torch.float32).cpu().double()
    e = q.exponent.cpu().to(torch.int64) - 127
    step = torch.exp2((e - (fmt.mantissa_bits - 2)).double()).repeat_interleave(
        fmt.block_size, -1)
    xs = x.cpu().double()
    sat = xs.abs() >= (fmt.max_mantissa + 0.5) * step
    err = (y - xs).abs()
    assert (err[~sat] <= step[~sat] / 2).all()
    assert (y[sat].abs() == fmt.max_mantissa * step[sat]).all()


# ---------------------------------------------------------------------------------------
# every CPU kernel path gives the same bits
# ---------------------------------------------------------------------------------------
def test_cpu_isa_paths_bit_identical(cpu_isa):
    for fmt in [get_format("mxint8"), get_format("mxint4"), get_format("msfp16"),
                get_format("bfp16"), *CUSTOM]:
        for dtype in FLOAT_DTYPES:
            for k in (1, 7, 97, 1025):
                x = randn_blocks((3, k), fmt.block_size, dtype)
                x[0, k // 2] = float("nan")
                for rounding in ("nearest", "even"):
                    q = check_quantize(x, fmt, rounding)
                for out in FLOAT_DTYPES:
                    check_dequantize(q, out)
        # non-contiguous input
        x = randn_blocks((97, 5), fmt.block_size).T
        check_quantize(x, fmt)


def test_random_formats_fuzz(device):
    # random (bits, block, K, dtype, rounding, scale range) combinations, bit-exact
    g = torch.Generator().manual_seed(1234)

    def pick(n):
        return int(torch.randint(0, n, (1,), generator=g))

    for _ in range(60):
        bits = 2 + pick(7)
        block = [1, 2, 3, 5, 8, 16, 31, 32, 48, 64, 100, 1024][pick(12)]
        k = 1 + pick(300)
        dtype = FLOAT_DTYPES[pick(3)]
        lo = -140 + pick(240)
        fmt = BFPFormat("fuzz", bits, block)
        x = randn_blocks((1 + pick(4), k), block, dtype, device, (lo, min(lo + 1 + pick(60), 120)))
        q = check_quantize(x, fmt, ("nearest", "even")[pick(2)])
        check_dequantize(q, FLOAT_DTYPES[pick(3)])


def test_thread_count_does_not_change_bits():
    x = randn_blocks((64, 1025), 32, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        q1 = ops.bfp_quantize(x, "mxint4")
        y1 = ops.bfp_dequantize(q1, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    q2 = check_quantize(x, get_format("mxint4"))
    assert torch.equal(q1.mantissa, q2.mantissa) and torch.equal(q1.exponent, q2.exponent)
    assert_equal_nan(y1, ops.bfp_dequantize(q2, torch.bfloat16))
