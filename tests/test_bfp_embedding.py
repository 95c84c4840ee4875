"""llmcore::bfp_embedding (CPU) and BFPEmbedding: a lookup of BFP table rows, from the plain
layout or the GEMV tile layout, must equal bfp_dequantize of the whole table indexed by
the ids, bit for bit, and refuse bad ids with IndexError."""

import pytest
import torch
from helpers import FLOAT_DTYPES
from test_bfp_linear import make_weight, weight64

from llmcore.formats import BFPFormat
from llmcore.nn import BFPEmbedding
from llmcore.ops.bfp import tile_layout

ops = torch.ops.llmcore


def table(n, k, bits):
    fmt = BFPFormat(f"e{bits}", bits, 32)
    return make_weight(n, k, fmt, "cpu"), fmt


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("tiled", [False, True])
def test_lookup_matches_definition(bits, tiled):
    """Every format, both layouts, every output dtype: the rows of the float64 reference
    dequantisation, rounded once to the dtype (what bfp_dequantize gives)."""
    n, k = 48, 160
    q, fmt = table(n, k, bits)
    m, e = (tile_layout(q.mantissa, q.exponent, fmt, k) if tiled else (q.mantissa, q.exponent))
    ids = torch.tensor([[0, 47, 17], [17, 31, 16]])
    want = weight64(q)[ids]
    for dtype in FLOAT_DTYPES:
        y = ops.bfp_embedding(m, e, ids, bits, 32, k, dtype)
        assert y.shape == (2, 3, k) and y.dtype == dtype
        assert torch.equal(y, want.to(dtype))


def test_ids_dtypes_shapes_noncontiguous():
    q, fmt = table(32, 64, 4)
    tm, te = tile_layout(q.mantissa, q.exponent, fmt, 64)
    ids = torch.randint(0, 32, (6, 4))
    want = ops.bfp_embedding(q.mantissa, q.exponent, ids, 4, 32, 64, torch.float32)
    strided = ids.t().contiguous().t()  # the same ids, column-major
    strided32 = strided.to(torch.int32)
    assert not strided.is_contiguous() and not strided32.is_contiguous()
    for i in (ids.to(torch.int32), strided, strided32):
        for m, e in ((q.mantissa, q.exponent), (tm, te)):
            assert torch.equal(ops.bfp_embedding(m, e, i, 4, 32, 64, torch.float32), want)
    sc = ops.bfp_embedding(q.mantissa, q.exponent, torch.tensor(5), 4, 32, 64, torch.float32)
    assert sc.shape == (64,) and torch.equal(sc, weight64(q)[5].float())
    empty = ops.bfp_embedding(tm, te, torch.zeros(0, 3, dtype=torch.long), 4, 32, 64,
                              torch.bfloat16)
    assert empty.shape == (0, 3, 64) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("tiled", [False, True])
def test_out_of_range_ids_raise_index_error(tiled):
    q, fmt = table(32, 64, 8)
    m, e = (tile_layout(q.mantissa, q.exponent, fmt, 64) if tiled else (q.mantissa, q.exponent))
    for bad in (32, -1, 2**40):
        with pytest.raises(IndexError, match=r"ids must lie in \[0, 32\).*got " + str(bad)):
            ops.bfp_embedding(m, e, torch.tensor([0, bad]), 8, 32, 64, torch.float32)


def test_argument_errors():
    q, _ = table(32, 64, 8)
    m, e = q.mantissa, q.exponent
    ids = torch.tensor([1])
    with pytest.raises(ValueError, match="ids must have dtype int64 or int32"):
        ops.bfp_embedding(m, e, ids.float(), 8, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        ops.bfp_embedding(m, e, ids, 8, 32, 64, torch.int32)
    with pytest.raises(ValueError, match=r"mantissa.size\(-1\) must be 96"):
        ops.bfp_embedding(m, e, ids, 8, 32, 96, torch.float32)
    with pytest.raises(ValueError, match="mantissa must have dtype uint8"):
        ops.bfp_embedding(m, e, ids, 4, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="exponent in the tile layout"):
        tm, te = tile_layout(m, e, q.format, 64)
        ops.bfp_embedding(tm, te[:, :1], ids, 8, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.bfp_embedding(m, e, ids, 8, 32, 0, torch.float32)


def test_many_ids_at_two_threads():
    """Enough ids to span several of the helper threads' chunks: same bits as 1 thread."""
    q, fmt = table(64, 1024, 4)
    tm, te = tile_layout(q.mantissa, q.exponent, fmt, 1024)
    ids = torch.randint(0, 64, (300,))
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append([ops.bfp_embedding(m, e, ids, 4, 32, 1024, torch.float16)
                         for m, e in ((q.mantissa, q.exponent), (tm, te))])
    finally:
        torch.set_num_threads(before)
    want = weight64(q)[ids].half()
    for y in (*outs[0], *outs[1]):
        assert torch.equal(y, want)


def test_opcheck():
    q, fmt = table(32, 64, 4)
    tm, te = tile_layout(q.mantissa, q.exponent, fmt, 64)
    for m, e in ((q.mantissa, q.exponent), (tm, te)):
        torch.library.opcheck(ops.bfp_embedding,
                              (m, e, torch.tensor([[3, 1]]), 4, 32, 64, torch.float32))


@pytest.mark.parametrize("fmt", ["mxint8", "mxint4"])
def test_module_uses_op_and_matches_fallback(fmt, monkeypatch):
    """BFPEmbedding on the CPU: one op call; the generic path (other devices) gives the
    same values and the same IndexError."""
    import llmcore.nn.bfp_linear as bl

    emb = torch.nn.Embedding(48, 64)
    b = BFPEmbedding.from_embedding(emb, fmt)
    ids = torch.tensor([[3, 47], [0, 3]])
    fast = b(ids)
    monkeypatch.setitem(bl._CPU_KERNELS, ("bfp_embedding", torch.float32), False)
    assert torch.equal(b(ids), fast)
    with pytest.raises(IndexError, match="ids must lie in"):
        b(torch.tensor([48]))
