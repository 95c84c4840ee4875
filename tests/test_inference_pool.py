"""Under torch.inference_mode the CPU compute kernels (prefill GEMM and its packing, the
attention forward, quantisation, the tile layout) share their work out on llmcore's helper
threads instead of torch's OpenMP threads (csrc/common/parallel.h: parallel_items). The
split must not change a bit: each kernel is run under inference mode and under no_grad at
two or more threads and at one, and the results compared exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import randn
from helpers.attention import make_qkv

from llmcore import _ext, ops
from llmcore.formats import get_format

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")


def _both_modes(fn):
    """fn() under no_grad at 1 thread, under no_grad and under inference_mode at 2+."""
    threads = torch.get_num_threads()
    out = {}
    try:
        for name, n, ctx in (("one", 1, torch.no_grad), ("omp", max(2, threads), torch.no_grad),
                             ("pool", max(2, threads), torch.inference_mode),
                             ("pool3", 3, torch.inference_mode)):
            torch.set_num_threads(n)
            with ctx():
                out[name] = fn()
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_same(out):
    base = out["one"]
    base = base if isinstance(base, (tuple, list)) else (base,)
    for name, got in out.items():
        got = got if isinstance(got, (tuple, list)) else (got,)
        for a, b in zip(base, got, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_forward(dtype):
    q, k, v = make_qkv(2, 97, 131, 6, 2, 64, dtype, "cpu")
    _assert_same(_both_modes(lambda: ops.attention(q, k, v, causal=True)))


@pytest.mark.parametrize("fmt", ["mxint8", "mxint4"])
def test_quantize_dequantize_and_tiles(fmt):
    f = get_format(fmt)
    x = randn((333, 256))
    out = _both_modes(lambda: torch.ops.llmcore.bfp_quantize(x, f.mantissa_bits, f.block_size,
                                                            False))
    _assert_same(out)
    m, e = out["one"]
    _assert_same(_both_modes(lambda: torch.ops.llmcore.bfp_dequantize(
        m, e, f.mantissa_bits, f.block_size, 256, torch.float32)))
    m16, e16 = m[:320], e[:320]
    tiles = _both_modes(lambda: torch.ops.llmcore.bfp_tiles_pack(m16, e16, f.mantissa_bits,
                                                                 f.block_size))
    _assert_same(tiles)
    t, te = tiles["one"]
    back = _both_modes(lambda: torch.ops.llmcore.bfp_tiles_unpack(t, te, f.mantissa_bits,
                                                                  f.block_size))
    _assert_same(back)
    assert torch.equal(back["pool"][0], m16) and torch.equal(back["pool"][1], e16)


@pytest.mark.parametrize("fmt,m", [("mxint8", 100), ("mxint4", 100), ("mxint8", 17)])
def test_prefill_gemm(fmt, m):
    """The int8-activation prefill GEMM (packing and tiles) and the weight-only product."""
    w = ops.bfp_quantize(randn((1000, 320)), fmt)
    x = randn((m, 320))
    _assert_same(_both_modes(lambda: ops.bfp_linear(x, w, act_format="mxint8")))
    _assert_same(_both_modes(lambda: ops.bfp_linear(x, w)))


def test_calls_from_several_threads():
    """Inference-mode calls from several Python threads at once (one holds the helpers, the
    others run on their own thread) give the one-thread bits."""
    w = ops.bfp_quantize(randn((640, 256)), "mxint8")
    xs = [randn((m, 256)) for m in (20, 33, 64)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = [ops.bfp_linear(x, w, act_format="mxint8") for x in xs]
    finally:
        torch.set_num_threads(threads)
    errors = []

    def work(seed):
        with torch.inference_mode():
            for i in range(20):
                j = (seed + i) % len(xs)
                if not torch.equal(ops.bfp_linear(xs[j], w, act_format="mxint8"), want[j]):
                    errors.append((seed, i))

    torch.set_num_threads(max(2, threads))
    try:
        ts = [threading.Thread(target=work, args=(s,)) for s in range(3)]
        for t in ts:
            t.start()
        work(99)
        for t in ts:
            t.join()
    finally:
        torch.set_num_threads(threads)
    assert not errors
