"""The GEMV tile layout of BFP weights (docs/bfp.md): the same bytes reordered for the CPU
decode kernels. The layout itself (the C++ pack / unpack ops against the torch permutation
and the definition), the kernels on it (bit for bit the plain layout's results, every ISA
path, every M, NaN / Inf, prefill rows), and the modules and models that hold it
(state_dict, qweight, tied embeddings, save / load)."""

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_within, randn
from test_bfp_linear import act_expected, gemv_isa, make_weight  # noqa: F401  (a fixture)

from llmcore.formats import get_format
from llmcore.models import Transformer, TransformerConfig
from llmcore.nn import BFPEmbedding, BFPLinear
from llmcore.ops import BFPTensor
from llmcore.ops.bfp import plain_layout, tile_layout, tile_rows, tiles_supported

ops = torch.ops.llmcore


def tiles_of(q: BFPTensor):
    return ops.bfp_tiles_pack(q.mantissa, q.exponent, q.format.mantissa_bits, 32)


# ---- the layout -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_layout_definition_and_roundtrip(bits):
    """tiles[t, b, 64 g + 4 c + i] = mant[16 t + c, bb b + 4 g + i] (bb = block bytes),
    exps[t, b, c] = exp[16 t + c, b]; the C++ op, the torch permutation and its inverse."""
    from llmcore.formats import BFPFormat

    fmt = BFPFormat(f"t{bits}", bits, 32)
    n, k = 48, 96
    q = make_weight(n, k, fmt, "cpu")
    tm, te = ops.bfp_tiles_pack(q.mantissa, q.exponent, bits, 32)
    bb = 16 if bits <= 4 else 32
    assert tm.shape == (n // 16, k // 32, 16 * bb) and te.shape == (n // 16, k // 32, 16)
    assert tm.dtype == q.mantissa.dtype and te.dtype == torch.uint8
    m = q.mantissa.view(torch.uint8)
    for t, b, g, c in [(0, 0, 0, 0), (1, 2, bb // 4 - 1, 15), (2, 1, 1, 7)]:
        for i in range(4):
            assert tm.view(torch.uint8)[t, b, 64 * g + 4 * c + i] == m[16 * t + c, bb * b + 4 * g + i]
        assert te[t, b, c] == q.exponent[16 * t + c, b]
    tm2, te2 = tile_layout(q.mantissa, q.exponent, fmt, k)
    assert torch.equal(tm, tm2) and torch.equal(te, te2)
    m3, e3 = ops.bfp_tiles_unpack(tm, te, bits, 32)
    m4, e4 = plain_layout(tm, te, fmt, k)
    for a, b in ((m3, q.mantissa), (e3, q.exponent), (m4, q.mantissa), (e4, q.exponent)):
        assert torch.equal(a, b)
    rows = torch.tensor([0, 17, 47, 17, 30])
    mr, er = tile_rows(tm, te, fmt, k, rows)
    assert torch.equal(mr, q.mantissa[rows]) and torch.equal(er, q.exponent[rows])


def test_layout_errors():
    q = make_weight(40, 64, "mxint8", "cpu")  # 40 rows: not whole tiles
    with pytest.raises(ValueError, match="N .rows. a multiple of 16"):
        ops.bfp_tiles_pack(q.mantissa, q.exponent, 8, 32)
    q = make_weight(32, 80, "mxint8", "cpu")
    with pytest.raises(ValueError, match="K a multiple of 32"):
        ops.bfp_tiles_pack(q.mantissa, q.exponent, 8, 32)
    q = make_weight(32, 64, "mxint8", "cpu")
    with pytest.raises(ValueError, match="dtype"):
        ops.bfp_tiles_pack(q.mantissa.view(torch.uint8), q.exponent, 8, 32)
    tm, te = tiles_of(q)
    with pytest.raises(ValueError, match="tile_exponent"):
        ops.bfp_tiles_unpack(tm, te[:, :1], 8, 32)
    with pytest.raises(ValueError, match="tiles in the tile layout must be"):
        ops.bfp_tiles_unpack(tm[:, :, :256], te, 8, 32)
    assert tiles_supported((32, 64), get_format("mxint4"))
    assert not tiles_supported((32, 64), get_format("msfp16"))  # blocks of 16
    assert not tiles_supported((24, 64), get_format("mxint8"))


# ---- the kernels on it --------------------------------------------------------------------
def both(x, q, bias=None, n_weights=1):
    """bfp_act_linear_multi of x with n_weights copies of q: plain layout, tile layout."""
    tm, te = tiles_of(q)
    b = q.format.mantissa_bits
    args = (8, b, 32, False, [bias] * n_weights)
    plain = ops.bfp_act_linear_multi(x, [q.mantissa] * n_weights, [q.exponent] * n_weights, *args)
    tiled = ops.bfp_act_linear_multi(x, [tm] * n_weights, [te] * n_weights, *args)
    return plain, tiled


def same_order(isa: str, m: int, bits: int = 8) -> bool:
    """Whether the plain layout's kernel sums a column's blocks in the tile kernel's order
    (then the results are equal bit for bit): the scalar / AVX2 paths (the tile layout is
    unpacked for them), the AVX-512 column tiles (M > 1), and prefill of 8-bit weights
    (M > 16: the plain layout's GEMM and the tile kernel add the blocks in one order). The
    AVX-512 single-row and 256-byte step kernels sum in another order: the same value up to
    fp32 rounding; so does a prefill of 4-bit tiles (the GEMV kernels on the tiles, as
    test_tiles_prefill_in_row_blocks checks, against the plain layout's GEMM)."""
    if m > 16:
        return bits > 4
    return isa in ("scalar", "avx2") or (isa == "avx512-cols" and m > 1)


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
def test_tiles_every_m(wname, gemv_isa):  # noqa: F811
    """M = 1..16 (the decode GEMV: row tiles of up to 8) and 17, 40 (prefill), K of one and
    of many blocks, block exponents far apart, a bias, one and three weights per call: the
    quantised product within fp32 accumulation of float64, and bit for bit the plain
    layout's result where that kernel sums in the same order."""
    for n, k in ((16, 32), (48, 352)):
        q = make_weight(n, k, wname, "cpu")
        x = randn((40, k)) * torch.logspace(-3, 3, k)
        b = randn((n,))
        for m in [*range(1, 17), 17, 40]:
            want, tol = act_expected(x[:m], q, "mxint8", "nearest", b)
            for nw in (1, 3):
                plain, tiled = both(x[:m], q, b, nw)
                for p, t in zip(plain, tiled, strict=True):
                    assert_within(t, want, tol, f"tiles m={m} k={k}")
                    if same_order(gemv_isa, m, q.format.mantissa_bits):
                        assert torch.equal(p, t), (n, k, m, nw)


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
@pytest.mark.parametrize("m", [17, 40, 129, 300])
def test_tiles_prefill_in_row_blocks(m, wname, gemv_isa):  # noqa: F811
    """A prefill of tiles on a CPU without AMX (the fixture's ISAs stop at AVX-512) runs the
    decode GEMV's kernels on the rows (in chunks of up to 256 rows for this K: 300 takes
    two): bit for bit the calls of up to 16 rows, within the documented error of float64,
    for one and three weights, with leading dims, in fp32 and bf16. 8-bit tiles take that
    path where the AVX-512 tile kernel reads them (elsewhere the GEMM: the documented
    error only)."""
    n, k = 48, 352
    q = make_weight(n, k, wname, "cpu")
    tm, te = tiles_of(q)
    x = randn((m, k)) * torch.logspace(-3, 3, k)
    b = randn((n,))
    want, tol = act_expected(x, q, "mxint8", "nearest", b)
    bits = q.format.mantissa_bits
    by_gemv = bits <= 4 or gemv_isa.startswith("avx512")
    for nw in (1, 3):
        args = ([tm] * nw, [te] * nw, 8, bits, 32, False, [b] * nw)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            whole = ops.bfp_act_linear_multi(xd.view(1, m, k), *args)
            parts = [ops.bfp_act_linear_multi(xd[i:i + 16], *args) for i in range(0, m, 16)]
            for i, y in enumerate(whole):
                assert y.shape == (1, m, n) and y.dtype == dtype
                if by_gemv:
                    assert torch.equal(y[0], torch.cat([p[i] for p in parts])), (m, nw, dtype)
                if dtype == torch.float32:
                    assert_within(y[0], want, tol, f"row blocks m={m}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_tiles_dtypes_leading_dims_noncontiguous(dtype, gemv_isa):  # noqa: F811
    q = make_weight(32, 128, "mxint4", "cpu")
    for x in (randn((2, 3, 128), dtype), randn((128, 5), dtype).T, randn((0, 128), dtype)):
        bias = randn((32,), dtype)
        plain, tiled = both(x, q, bias)
        assert tiled[0].shape == (*x.shape[:-1], 32) and tiled[0].dtype == dtype
        want, tol = act_expected(x, q, "mxint8", "nearest", bias)
        assert_within(tiled[0].reshape(-1, 32), want, tol, f"tiles {dtype}")
        if same_order(gemv_isa, x.numel() // 128):
            assert torch.equal(plain[0], tiled[0])


def test_tiles_nan_inf(gemv_isa):  # noqa: F811
    """A NaN weight block (exponent byte 255) makes its column NaN; an Inf activation its
    row: as in the plain layout."""
    q = make_weight(32, 96, "mxint8", "cpu", nan_at=[(19, 40)])
    x = randn((5, 96))
    x[2, 7] = float("inf")
    plain, tiled = both(x, q)
    want = torch.zeros(5, 32, dtype=torch.bool)
    want[2, :] = True
    want[:, 19] = True
    assert torch.equal(torch.isnan(tiled[0]), want)
    assert torch.equal(torch.isnan(plain[0]), want)


@pytest.mark.parametrize("wname", ["mxint8", "mxint4"])
def test_tiles_scales_at_the_float_limits(wname, gemv_isa):  # noqa: F811
    """With several rows the tile kernel multiplies the weight and activation block scales
    on their exponent fields where every product is a normal float, and in floating point
    elsewhere (zero, subnormal, overflowing or NaN scales): tiles whose weight exponents
    reach the limits beside tiles that do not, activations from 2^-140 to 2^120, M of one
    and of two row tiles. Bit for bit the plain layout's kernel (which always multiplies in
    floating point) where it sums in the same order; the columns of in-range tiles within
    the documented error of float64."""
    n, k = 48, 96
    for byte in (0, 1, 2, 3, 4, 60, 200, 250, 253, 254, 255):
        q = make_weight(n, k, wname, "cpu")
        q.exponent[16:32] = byte  # the middle tile only
        for p2 in (-140, -120, -100, 0, 100, 120):
            x = randn((9, k)) * 2.0**p2
            for m in (1, 2, 5, 9):
                plain, tiled = both(x[:m], q)
                if same_order(gemv_isa, m, q.format.mantissa_bits):
                    torch.testing.assert_close(tiled[0], plain[0], rtol=0, atol=0,
                                               equal_nan=True, msg=f"{byte} {p2} {m}")
                if p2 == 0:
                    cols = torch.cat([torch.arange(16), torch.arange(32, 48)])
                    want, tol = act_expected(x[:m], q, "mxint8", "nearest")
                    assert_within(tiled[0][:, cols], want[:, cols], tol[:, cols],
                                  f"byte {byte} m={m}")


def test_tiles_mixed_layouts_refused():
    q = make_weight(32, 64, "mxint8", "cpu")
    tm, te = tiles_of(q)
    with pytest.raises(ValueError, match="one layout"):
        ops.bfp_act_linear_multi(randn((1, 64)), [q.mantissa, tm], [q.exponent, te], 8, 8, 32,
                                 False, [None, None])
    with pytest.raises(ValueError, match="K a multiple of 32"):
        ops.bfp_act_linear(randn((1, 32)), tm[:, :1], te[:, :1], 8, 8, 16, False, None)
    with pytest.raises(ValueError, match="w_exponent in the tile layout"):
        ops.bfp_act_linear(randn((1, 64)), tm, te[:1], 8, 8, 32, False, None)


def test_tile_ops_opcheck():
    q = make_weight(32, 64, "mxint4", "cpu")
    torch.library.opcheck(ops.bfp_tiles_pack, (q.mantissa, q.exponent, 4, 32))
    tm, te = tiles_of(q)
    torch.library.opcheck(ops.bfp_tiles_unpack, (tm, te, 4, 32))
    torch.library.opcheck(ops.bfp_act_linear_multi,
                          (randn((2, 64)), [tm], [te], 8, 4, 32, False, [None]))


# ---- modules -----------------------------------------------------------------------------
def linear(n=48, k=96, fmt="mxint4", act="mxint8", bias=True):
    torch.manual_seed(0)
    return BFPLinear.from_linear(torch.nn.Linear(k, n, bias=bias), fmt, act_format=act)


def test_bfplinear_tile_state_dict_and_forward():
    plain, tiled = linear(), linear().tile_()
    assert tiled.tiled and not plain.tiled
    assert tiled.weight_mantissa.dim() == 3
    sd, sd2 = plain.state_dict(), tiled.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    q, q2 = plain.qweight, tiled.qweight
    assert torch.equal(q.mantissa, q2.mantissa) and torch.equal(q.exponent, q2.exponent)
    for shape in ((1, 96), (5, 96), (2, 20, 96)):
        x = randn(shape)
        with torch.inference_mode():
            assert torch.equal(plain(x), tiled(x))
        xg = x.clone().requires_grad_()  # a gradient to record: the tiles' op, autograd
        yg = tiled(xg)
        yg.sum().backward()
        with torch.inference_mode():
            assert torch.equal(yg.detach(), tiled(x))
        assert torch.allclose(yg.detach(), plain(x).detach(), rtol=1e-5, atol=1e-5)
        assert xg.grad is not None
    tiled.untile_()
    assert not tiled.tiled and torch.equal(tiled.weight_mantissa, plain.weight_mantissa)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt", ["mxint8", "mxint4"])
def test_bfplinear_tiled_with_gradients(monkeypatch, fmt, bias):
    """A frozen tiled layer called with gradients on (a user's forward without no_grad,
    x requiring grad) runs the inference op on the tiles, the same bits, without laying
    the weight out again; the backward lays it out once and gives the straight-through
    gradients of x and the bias: grad_y @ W and the sum of grad_y, W the dequantised weight."""
    import llmcore.nn.bfp_linear as bl

    tiled = linear(fmt=fmt, bias=bias).tile_()
    if bias:
        tiled.bias.requires_grad_(True)
    relaid = []
    real = bl.plain_layout
    monkeypatch.setattr(bl, "plain_layout", lambda *a: relaid.append(1) or real(*a))
    x = randn((2, 7, 96))
    xg = x.clone().requires_grad_()
    y = tiled(xg)
    assert not relaid and y.requires_grad
    with torch.inference_mode():
        assert torch.equal(y.detach(), tiled(x))
    gy = randn(y.shape)
    y.backward(gy)
    assert len(relaid) == 1
    w = tiled.qweight.dequantize(torch.float32).double()
    want = gy.double().reshape(-1, 48) @ w
    assert torch.allclose(xg.grad.double().reshape(-1, 96), want, rtol=1e-5, atol=1e-5)
    if bias:
        assert torch.allclose(tiled.bias.grad.double(), gy.double().sum((0, 1)), rtol=1e-5,
                              atol=1e-5)
    # only the bias records a gradient: the same op, its gradient
    if bias:
        tiled.bias.grad = None
        y2 = tiled(x)
        y2.sum().backward()
        assert torch.allclose(tiled.bias.grad, torch.full((48,), 14.0))


def test_bfplinear_load_state_dict_into_tiled():
    src, dst = linear(), linear().tile_()
    with torch.no_grad():
        src.weight_mantissa.copy_(torch.flip(src.weight_mantissa, [0]))
    dst.load_state_dict(src.state_dict())
    assert dst.tiled
    assert torch.equal(dst.qweight.mantissa, src.weight_mantissa)
    x = randn((3, 96))
    with torch.inference_mode():
        assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("case", ["weight-only", "rows", "cols", "trainable", "block16"])
def test_bfplinear_cannot_tile(case):
    mod = {"weight-only": lambda: linear(act=None), "rows": lambda: linear(n=40),
           "cols": lambda: linear(k=80), "block16": lambda: linear(fmt="msfp16", act="msfp16"),
           "trainable": lambda: BFPLinear(64, 32, act_format="mxint8", trainable=True)}[case]()
    assert not mod.can_tile()
    with pytest.raises(ValueError, match="tile_ needs"):
        mod.tile_()


# ---- models ------------------------------------------------------------------------------
def model(tie=True):
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                            vocab_size=256, max_seq_len=128, tie_embeddings=tie)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fmt", ["mxint8", "mxint4"])
def test_model_tiles_same_outputs(tie, fmt, tmp_path):
    """quantize(tiles=True) against tiles=False: the same logits (prefill, cached single-token
    and 5-token steps; every tiled projection has K = 64, two blocks, so any summation order
    gives the same fp32 sums), a tied head still tied (its lookups from the tiles), the same
    state_dict, and a save / load round trip that tiles again."""
    a = model(tie).quantize(fmt, tiles=False)
    b = model(tie).quantize(fmt, tiles=True)
    n_tiled = sum(isinstance(m, BFPLinear) and m.tiled for m in b.modules())
    assert n_tiled == 2 * 6 + 1  # every projection but down_proj (K = 176), and the head
    assert b.head_tied() == tie and isinstance(b.embed_tokens, BFPEmbedding)
    if tie:
        assert b.embed_tokens.weight_mantissa.dim() == 3
    ids = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        assert torch.equal(a(ids), b(ids))
        ca, cb = a.new_cache(2, 64), b.new_cache(2, 64)
        a(ids, cache=ca, prefill=True)
        b(ids, cache=cb, prefill=True)
        for t in (1, 5, 1):
            nxt = torch.randint(0, 256, (2, t))
            assert torch.equal(a(nxt, cache=ca), b(nxt, cache=cb))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    b.save_pretrained(str(tmp_path / "m"))
    c = Transformer.from_pretrained(str(tmp_path / "m"), tiles=True)
    assert sum(isinstance(m, BFPLinear) and m.tiled for m in c.modules()) == n_tiled
    assert c.head_tied() == tie
    with torch.inference_mode():
        assert torch.equal(c(ids), a(ids))
    assert b.untile_weights() == n_tiled and b.head_tied() == tie
    assert b.embed_tokens.weight_mantissa.dim() == 2
    with torch.inference_mode():
        assert torch.equal(b(ids), a(ids))


def test_tied_lookup_out_of_range():
    b = model(True).quantize("mxint8", tiles=True)
    with pytest.raises(IndexError, match="ids must lie in"):
        b.embed_tokens(torch.tensor([256]))


def test_quantize_tiles_argument():
    with pytest.raises(ValueError, match="tiles must be"):
        model().quantize("mxint8", tiles="yes")
    m = model().quantize("mxint8", tiles=False)
    assert not any(getattr(x, "tiled", False) for x in m.modules())
    assert m.tile_weights() == 13 and m.tile_weights() == 0
