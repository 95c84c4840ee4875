"""Bad input to the BFP ops gives a clear ValueError/RuntimeError/TypeError naming the
argument (docs/ops.md) — never a crash or an out-of-bounds read. Covers the Python face
(llmcore.ops) and the bindings (torch.ops.llmcore.*) directly."""

import pytest
import torch
from helpers import HAS_CUDA, randn

from llmcore import ops
from llmcore import reference as ref
from llmcore.formats import get_format
from llmcore.ops import BFPTensor

ERR = (ValueError, RuntimeError)
lib = torch.ops.llmcore


def _q(n, k, name, device):
    f = get_format(name)
    m, e = ref.bfp_quantize(randn((n, k)), f.mantissa_bits, f.block_size)
    return BFPTensor(m, e, f, (n, k)).to(device)


# ---------------------------------------------------------------------------------------
# llmcore.ops
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64, torch.bool,
                                   torch.complex64], ids=str)
def test_quantize_bad_dtype(dtype, device):
    x = torch.ones(2, 32, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=r"\bx\b.*float32"):
        ops.bfp_quantize(x)


def test_quantize_not_a_tensor():
    with pytest.raises(TypeError, match=r"\bx\b"):
        ops.bfp_quantize([1.0, 2.0])


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 0, 0)], ids=str)
def test_quantize_empty_last_axis(shape, device):
    with pytest.raises(ValueError, match=r"\bx\b.*last axis"):
        ops.bfp_quantize(torch.ones(shape, device=device))


def test_quantize_unknown_format_and_rounding(device):
    x = randn((2, 32), device=device)
    with pytest.raises(ValueError, match="unknown BFP format 'mxint9'"):
        ops.bfp_quantize(x, "mxint9")
    with pytest.raises(TypeError, match="format"):
        ops.bfp_quantize(x, 8)
    with pytest.raises(ValueError, match="rounding"):
        ops.bfp_quantize(x, "mxint8", "stochastic")


def test_dequantize_bad_args(device):
    q = _q(2, 32, "mxint8", device)
    with pytest.raises(TypeError, match=r"\bq\b"):
        ops.bfp_dequantize(q.mantissa)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(ValueError, match="dtype"):
            ops.bfp_dequantize(q, dtype)
        with pytest.raises(ValueError, match="dtype"):
            q.dequantize(dtype)


def test_linear_bad_x(device):
    q = _q(5, 32, "mxint8", device)
    with pytest.raises(ValueError, match=r"\bx\b"):
        ops.bfp_linear(torch.ones(3, 32, dtype=torch.int64, device=device), q)
    with pytest.raises(ValueError, match=r"\bx\b"):
        ops.bfp_linear(torch.ones(3, 32, dtype=torch.float64, device=device), q)
    with pytest.raises(TypeError, match=r"\bx\b"):
        ops.bfp_linear("x", q)


def test_linear_bad_weight(device):
    x = randn((3, 32), device=device)
    with pytest.raises(TypeError, match="weight"):
        ops.bfp_linear(x, randn((5, 32), device=device))
    w3 = ops.bfp_quantize(randn((2, 5, 32), device=device))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.bfp_linear(x, w3)
    w1 = ops.bfp_quantize(randn((32,), device=device))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.bfp_linear(x, w1)


@pytest.mark.parametrize("act", [None, "mxint8"])
def test_linear_k_mismatch(act, device):
    q = _q(5, 32, "mxint8", device)
    for x in (randn((3, 33), device=device), randn((3, 31), device=device),
              randn((32, 3), device=device), torch.tensor(1.0, device=device)):
        with pytest.raises(ValueError, match=r"x\.shape\[-1\].*32"):
            ops.bfp_linear(x, q, act_format=act)


@pytest.mark.parametrize("act", [None, "mxint8"])
def test_linear_bad_bias(act, device):
    q = _q(5, 32, "mxint8", device)
    x = randn((3, 32), device=device)
    for bias in (randn((6,), device=device), randn((4,), device=device),
                 randn((1, 5), device=device), randn((5, 1), device=device),
                 torch.tensor(1.0, device=device), [0.0] * 5):
        with pytest.raises(ValueError, match="bias"):
            ops.bfp_linear(x, q, bias, act_format=act)


def test_linear_bad_act_format_and_rounding(device):
    q = _q(5, 32, "mxint8", device)
    x = randn((3, 32), device=device)
    with pytest.raises(ValueError, match="unknown BFP format"):
        ops.bfp_linear(x, q, act_format="int8")
    with pytest.raises(ValueError, match="rounding"):
        ops.bfp_linear(x, q, act_format="mxint8", rounding="up")
    # an invalid option is rejected on the weight-only path too, not silently ignored
    with pytest.raises(ValueError, match="rounding"):
        ops.bfp_linear(x, q, rounding="up")


# ---------------------------------------------------------------------------------------
# torch.ops.llmcore.* directly: the bindings validate everything they read
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16])
def test_op_quantize_bad_bits(bits, device):
    with pytest.raises(ERR, match="mantissa_bits"):
        lib.bfp_quantize(randn((2, 32), device=device), bits, 32, False)


@pytest.mark.parametrize("block", [-32, 0, 1025, 1 << 40])
def test_op_quantize_bad_block(block, device):
    with pytest.raises(ERR, match="block_size"):
        lib.bfp_quantize(randn((2, 32), device=device), 8, block, False)


def test_op_quantize_bad_x(device):
    for x in (torch.ones(2, 32, dtype=torch.float64, device=device),
              torch.ones(2, 32, dtype=torch.int32, device=device),
              torch.ones(2, 0, device=device), torch.tensor(1.0, device=device)):
        with pytest.raises(ERR, match=r"\bx\b"):
            lib.bfp_quantize(x, 8, 32, False)


def _deq_args(device, name="mxint8", k=64):
    f = get_format(name)
    q = _q(4, k, name, device)
    return q.mantissa, q.exponent, f.mantissa_bits, f.block_size, k, torch.float32


def test_op_dequantize_valid_baseline(device):
    m, e, bits, block, k, dt = _deq_args(device)
    assert lib.bfp_dequantize(m, e, bits, block, k, dt).shape == (4, 64)


@pytest.mark.parametrize("name", ["mxint8", "mxint4"])
@pytest.mark.parametrize("k", [63, 65, 128, 1 << 31, (1 << 62)])
def test_op_dequantize_mantissa_inconsistent_with_k(name, k, device):
    m, e, bits, block, k0, dt = _deq_args(device, name)
    if get_format(name).packed and k == 63:
        k = 62  # 63 needs the same 32 bytes as 64: not an inconsistency
    # either tensor may be named first (k = 65, 128, ... contradict both)
    with pytest.raises(ERR, match="mantissa|exponent"):
        lib.bfp_dequantize(m, e, bits, block, k, dt)


def test_op_dequantize_bad_tensors(device):
    m, e, bits, block, k, dt = _deq_args(device)
    cases = [
        ("mantissa", (m[:, :40], e, bits, block, k, dt)),  # fewer columns than k
        ("exponent", (m, e[:, :1], bits, block, k, dt)),  # fewer blocks than ceil(k/B)
        ("exponent", (m, torch.cat([e, e], -1), bits, block, k, dt)),
        ("exponent", (m, e[:3], bits, block, k, dt)),  # leading dims differ
        ("exponent", (m, e[0], bits, block, k, dt)),  # rank differs
        ("mantissa", (m.view(torch.uint8), e, bits, block, k, dt)),  # 8-bit must be int8
        ("exponent", (m, e.view(torch.int8), bits, block, k, dt)),
        ("mantissa", (m.float(), e, bits, block, k, dt)),
        # block size inconsistent with the exponent tensor
        ("exponent", (m, e, bits, 16, k, dt)),
        ("exponent", (m, e, bits, 64, k, dt)),
        ("mantissa_bits", (m, e, 9, block, k, dt)),
        ("mantissa_bits", (m, e, 1, block, k, dt)),
        ("block_size", (m, e, bits, 0, k, dt)),
        (r"\bk\b", (m, e, bits, block, -1, dt)),
        ("dtype", (m, e, bits, block, k, torch.int32)),
        ("dtype", (m, e, bits, block, k, torch.float64)),
    ]
    for what, args in cases:
        with pytest.raises(ERR, match=what):
            lib.bfp_dequantize(*args)


def test_op_dequantize_packed_layout_checked(device):
    m, e, bits, block, k, dt = _deq_args(device, "mxint4")  # m: uint8 [4, 32]
    for what, args in [
        ("mantissa", (m.view(torch.int8), e, 4, block, k, dt)),  # packed must be uint8
        ("mantissa", (m, e, 8, block, k, dt)),  # 8-bit reading a packed tensor: half the cols
        ("mantissa", (m[:, :31], e, 4, block, k, dt)),
        ("mantissa", (m, e, 4, block, k + 2, dt)),
    ]:
        with pytest.raises(ERR, match=what):
            lib.bfp_dequantize(*args)


def _gemm_args(device, a_name="mxint8", b_name="mxint4", m=3, n=5, k=64):
    fa, fb = get_format(a_name), get_format(b_name)
    a, b = _q(m, k, a_name, device), _q(n, k, b_name, device)
    return [a.mantissa, a.exponent, b.mantissa, b.exponent, fa.mantissa_bits, fb.mantissa_bits,
            fa.block_size, k, None, torch.float32]


def test_op_gemm_valid_baseline(device):
    assert lib.bfp_gemm(*_gemm_args(device)).shape == (3, 5)


def _replace(args, **kw):
    names = ["a_mantissa", "a_exponent", "b_mantissa", "b_exponent", "a_bits", "b_bits",
             "block_size", "k", "bias", "out_dtype"]
    out = list(args)
    for key, v in kw.items():
        out[names.index(key)] = v
    return out


def test_op_gemm_bad_inputs(device):
    g = _gemm_args(device)
    am, ae, bm, be = g[:4]
    cases = [
        (r"a[_ ]mantissa", _replace(g, a_mantissa=am[:, :60])),
        (r"b[_ ]mantissa", _replace(g, b_mantissa=bm[:, :30])),
        (r"a[_ ]mantissa", _replace(g, a_mantissa=am[0])),  # 1-D
        (r"b[_ ]mantissa", _replace(g, b_mantissa=bm.unsqueeze(0))),  # 3-D
        (r"a[_ ]exponent", _replace(g, a_exponent=ae[:, :1])),
        (r"b[_ ]exponent", _replace(g, b_exponent=be[:4])),  # rows differ from b_mantissa
        (r"a[_ ]exponent", _replace(g, a_exponent=ae[:2])),
        (r"a[_ ]mantissa", _replace(g, a_mantissa=am.view(torch.uint8))),
        (r"b[_ ]mantissa", _replace(g, b_mantissa=bm.view(torch.int8))),
        (r"b[_ ]mantissa", _replace(g, b_bits=8)),  # packed tensor read as 8-bit
        (r"a[_ ]mantissa|\bk\b", _replace(g, k=128)),
        (r"a[_ ]mantissa|\bk\b", _replace(g, k=1 << 40)),
        ("a_bits", _replace(g, a_bits=1)),
        ("b_bits", _replace(g, b_bits=9)),
        ("block_size", _replace(g, block_size=0)),
        ("out_dtype", _replace(g, out_dtype=torch.int32)),
        ("out_dtype", _replace(g, out_dtype=torch.float64)),
        ("bias", _replace(g, bias=randn((6,), device=device))),
        ("bias", _replace(g, bias=randn((1, 5), device=device))),
        ("bias", _replace(g, bias=torch.ones(5, dtype=torch.int32, device=device))),
    ]
    for what, args in cases:
        with pytest.raises(ERR, match=what):
            lib.bfp_gemm(*args)


@pytest.mark.parametrize("a_name,b_name", [("msfp16", "mxint8"), ("mxint8", "msfp12"),
                                           ("bfp16", "mxint4")])
def test_op_gemm_block_size_mismatch(a_name, b_name, device):
    # operands quantised with different block sizes cannot share one block_size
    fa, fb = get_format(a_name), get_format(b_name)
    a, b = _q(3, 64, a_name, device), _q(5, 64, b_name, device)
    for block in (fa.block_size, fb.block_size):
        with pytest.raises(ERR, match="exponent"):
            lib.bfp_gemm(a.mantissa, a.exponent, b.mantissa, b.exponent, fa.mantissa_bits,
                         fb.mantissa_bits, block, 64, None, torch.float32)


def test_op_linear_bad_inputs(device):
    q = _q(5, 64, "mxint8", device)
    x = randn((3, 64), device=device)
    m, e = q.mantissa, q.exponent
    cases = [
        (r"\bx\b", (x.unsqueeze(0), m, e, 8, 32, None)),  # the op takes x [M, K]
        (r"\bx\b", (x[0], m, e, 8, 32, None)),
        (r"\bx\b", (x.double(), m, e, 8, 32, None)),
        (r"\bx\b", (x.to(torch.int32), m, e, 8, 32, None)),
        (r"w[_ ]mantissa", (x[:, :60], m, e, 8, 32, None)),  # K mismatch
        (r"w[_ ]mantissa", (x, m[:, :60], e, 8, 32, None)),
        (r"w[_ ]mantissa", (x, m[0], e, 8, 32, None)),
        (r"w[_ ]mantissa", (x, m.view(torch.uint8), e, 8, 32, None)),
        (r"w[_ ]exponent", (x, m, e[:, :1], 8, 32, None)),
        (r"w[_ ]exponent", (x, m, e[:4], 8, 32, None)),
        (r"w[_ ]exponent", (x, m, e, 8, 16, None)),  # block size inconsistent with exponent
        (r"w[_ ]mantissa", (x, m, e, 4, 32, None)),  # int8 tensor read as packed
        ("mantissa_bits", (x, m, e, 9, 32, None)),
        ("mantissa_bits", (x, m, e, 0, 32, None)),
        ("block_size", (x, m, e, 8, 0, None)),
        ("bias", (x, m, e, 8, 32, randn((4,), device=device))),
        ("bias", (x, m, e, 8, 32, randn((5, 1), device=device))),
        ("bias", (x, m, e, 8, 32, torch.ones(5, dtype=torch.int64, device=device))),
    ]
    for what, args in cases:
        with pytest.raises(ERR, match=what):
            lib.bfp_linear(*args)


# ---------------------------------------------------------------------------------------
# BFPTensor constructor
# ---------------------------------------------------------------------------------------
def test_bfptensor_validation():
    q8 = _q(4, 40, "mxint8", "cpu")
    q4 = _q(4, 40, "mxint4", "cpu")
    m8, e8, m4, e4 = q8.mantissa, q8.exponent, q4.mantissa, q4.exponent
    BFPTensor(m8, e8, "mxint8", (4, 40))
    BFPTensor(m4, e4, "MXINT4", (4, 40), torch.bfloat16)
    cases = [
        ("mantissa", (m8.view(torch.uint8), e8, "mxint8", (4, 40))),
        ("mantissa", (m8, e8, "mxint8", (4, 41))),
        ("mantissa", (m8[:3], e8, "mxint8", (4, 40))),
        ("mantissa", (m8, e8, "mxint4", (4, 40))),
        ("mantissa", (m4, e4, "mxint8", (4, 40))),
        ("mantissa", (m4, e4, "mxint4", (4, 42))),
        ("exponent", (m8, e8.view(torch.int8), "mxint8", (4, 40))),
        ("exponent", (m8, e8[:, :1], "mxint8", (4, 40))),
        ("exponent", (m8, e8, "msfp16", (4, 40))),  # 3 blocks of 16, not 2 of 32
        ("exponent", (m8, e8[:2], "mxint8", (4, 40))),
        ("dimension", (m8, e8, "mxint8", ())),
        ("dtype", (m8, e8, "mxint8", (4, 40), torch.float64)),
        ("dtype", (m8, e8, "mxint8", (4, 40), torch.int8)),
        ("unknown BFP format", (m8, e8, "mxint7", (4, 40))),
    ]
    for what, args in cases:
        with pytest.raises(ValueError, match=what):
            BFPTensor(*args)
    with pytest.raises(ValueError, match="device"):
        BFPTensor(m8, e8.to("meta"), "mxint8", (4, 40))


# ---------------------------------------------------------------------------------------
# devices (CUDA only)
# ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_device_mismatch():
    q_cpu = _q(5, 64, "mxint8", "cpu")
    q_gpu = q_cpu.to("cuda")
    x_cpu, x_gpu = randn((3, 64)), randn((3, 64), device="cuda")
    with pytest.raises(ValueError, match="device"):
        ops.bfp_linear(x_gpu, q_cpu)
    with pytest.raises(ValueError, match="device"):
        ops.bfp_linear(x_cpu, q_gpu)
    with pytest.raises(ValueError, match="bias"):
        ops.bfp_linear(x_gpu, q_gpu, randn((5,)))
    with pytest.raises(ValueError, match="device"):
        BFPTensor(q_gpu.mantissa, q_cpu.exponent, "mxint8", (5, 64))
    m, e = q_gpu.mantissa, q_gpu.exponent
    with pytest.raises(ERR, match="exponent"):
        lib.bfp_dequantize(m, e.cpu(), 8, 32, 64, torch.float32)
    with pytest.raises(ERR, match=r"w[_ ]mantissa|w[_ ]exponent"):
        lib.bfp_linear(x_gpu, m.cpu(), e.cpu(), 8, 32, None)
    with pytest.raises(ERR, match=r"w[_ ]exponent"):
        lib.bfp_linear(x_gpu, m, e.cpu(), 8, 32, None)
    with pytest.raises(ERR, match="bias"):
        lib.bfp_linear(x_gpu, m, e, 8, 32, randn((5,)))
    a = _q(3, 64, "mxint8", "cuda")
    with pytest.raises(ERR, match=r"b[_ ]mantissa|b[_ ]exponent"):
        lib.bfp_gemm(a.mantissa, a.exponent, m.cpu(), e.cpu(), 8, 8, 32, 64, None,
                     torch.float32)
    with pytest.raises(ERR, match="bias"):
        lib.bfp_gemm(a.mantissa, a.exponent, m, e, 8, 8, 32, 64, randn((5,)), torch.float32)


# ---------------------------------------------------------------------------------------
# load_bfp: files that are not what they claim, named with the problem
# ---------------------------------------------------------------------------------------
def _tamper(src, dst, bfp_meta: str):
    import json as _json
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = _json.loads(data[8:8 + n])
    header["__metadata__"] = {**header["__metadata__"], "llmcore.bfp": bfp_meta}
    raw = _json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


BAD_FILES = {
    "empty": (lambda src, dst: dst.write_bytes(b""), "is empty"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[:100]), "truncated"),
    "absurd header": (lambda src, dst: dst.write_bytes((10**15).to_bytes(8, "little") + b"{}"),
                      "truncated"),
    "a pickle": (lambda src, dst: torch.save({"w": torch.zeros(2)}, dst), "pickle"),
    "metadata not JSON": (lambda src, dst: _tamper(src, dst, "{oops"), "llmcore.bfp.*JSON"),
    "metadata a list": (lambda src, dst: _tamper(src, dst, "[1]"), "llmcore.bfp"),
    "metadata missing keys": (lambda src, dst: _tamper(src, dst, '{"w": {"format": "mxint8"}}'),
                              "BFP tensor 'w'.*mantissa_bits"),
    "metadata names no tensor": (lambda src, dst: _tamper(src, dst, '{"z": {}}'),
                                 "'z'.*z.mantissa"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_bfp_bad_files(case, tmp_path):
    src = tmp_path / "good.safetensors"
    ops.save_bfp({"a": torch.randn(4, 8), "w": ops.bfp_quantize(torch.randn(4, 64))}, src)
    dst = tmp_path / "bad.safetensors"
    make, pattern = BAD_FILES[case]
    make(src, dst)
    with pytest.raises(ValueError, match=rf"bad.safetensors.*{pattern}"):
        ops.load_bfp(dst)


def test_load_bfp_not_a_regular_file(tmp_path):
    import os
    with pytest.raises(ValueError, match="is a directory"):
        ops.load_bfp(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ops.load_bfp(tmp_path / "missing.safetensors")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.safetensors")
        with pytest.raises(ValueError, match="named pipe"):  # would block forever if opened
            ops.load_bfp(tmp_path / "pipe.safetensors")
