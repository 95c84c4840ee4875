"""KV-cached decoding attention (docs/decode.md) over a contiguous float cache:
``ops.decode_attention`` against the float64 reference in llmcore.reference.decode.

Tolerances and poisoning: see tests/helpers/decode.py (docs/testing.md).
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DTYPES, need_kernel_dtype, randn
from helpers.decode import (
    check_decode,
    float_cache,
    head_dim_on,
    mixed_lengths,
)

from llmcore import _ext, ops

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


@pytest.mark.parametrize("op", ["decode_attention", "kv_cache_append"])
def test_kernel_registered(device, op):
    assert _ext.has_op(op), f"the extension does not define llmcore::{op} (stale build?)"
    assert _ext.has_kernel(op, device), f"no llmcore::{op} kernel for {device.type}"


DECODE_CASES = [
    (1, 1, 1, 64, 1, 97, None, False),
    (5, 2, 4, 128, 1, 97, None, False),
    (5, 1, 8, 64, 4, 61, None, True),
    (5, 2, 1, 80, 16, 33, 0.3, False),
    (5, 3, 4, 64, 16, 7, None, False),
    (1, 1, 8, 128, 16, 1025, None, False),  # one long sequence: the KV split (flash-decoding)
    (1, 2, 4, 80, 1, 1025, 0.05, True),
    (5, 1, 4, 128, 4, 300, 0.05, False),
    (1, 12, 1, 64, 1, 200, None, False),  # a small MHA model's decode step: 12 kv heads
    (2, 8, 4, 64, 5, 300, None, True),    # a GQA model verifying 4 drafts (20 rows a head)
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "b{}_hkv{}_g{}_d{}_q{}_s{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_decode_attention_matches_reference(device, isa, dtype, case):
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, lq, cap, scale, noncontig = case
    d = head_dim_on(device, d)
    lengths = mixed_lengths(b, cap, lq)
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    if noncontig:
        q = randn((b, hkv * g, lq, d), dtype).transpose(1, 2)
    else:
        q = randn((b, lq, hkv * g, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = ops.decode_attention(q.to(device), kc.to(device), vc.to(device),
                                    seqlens.to(device), softmax_scale=scale, return_lse=True)
    check_decode(out, lse, q, kc, vc, seqlens, scale, what=f"lengths {lengths}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_attention_queries_without_keys(device, dtype):
    """q_len > length: the first queries see no key (out exactly 0, lse -inf, no NaN)."""
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, lq, cap = 4, 2, 4, head_dim_on(device, 80), 16, 40
    lengths = [0, 1, 15, 16]
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    q = randn((b, lq, hkv * g, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = ops.decode_attention(q.to(device), kc.to(device), vc.to(device),
                                    seqlens.to(device), return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert torch.isneginf(lse[0]).all()
    assert torch.equal(out[1, :15].cpu(), torch.zeros_like(out[1, :15].cpu()))
    assert torch.isfinite(lse[1, :, 15]).all()
    check_decode(out, lse, q, kc, vc, seqlens, None, what=f"lengths {lengths}")


def test_decode_attention_empty(device):
    """batch 0 and q_len 0: empty outputs of the right shapes, no crash."""
    dtype = KERNEL_DTYPES[device.type][-1]
    kc, vc = (randn((2, 9, 2, 64), dtype, device) for _ in range(2))
    sl = torch.tensor([3, 9], dtype=torch.int32, device=device)
    out, lse = ops.decode_attention(randn((2, 0, 4, 64), dtype, device), kc, vc, sl,
                                    return_lse=True)
    assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 4, 0)
    out, lse = ops.decode_attention(randn((0, 1, 4, 64), dtype, device), kc[:0], vc[:0],
                                    sl[:0], return_lse=True)
    assert out.shape == (0, 1, 4, 64) and lse.shape == (0, 4, 1) and lse.dtype == torch.float32



@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lq", [2, 3, 5, 6, 7, 9, 13])
def test_decode_attention_row_independent_of_query_count(dtype, threads, lq):
    """A query row's output does not depend on how many rows share its call: the CPU
    kernel reads K/V straight from the cache for a few rows per kv head (in blocks of
    1-8 rows) and widens each tile once for many, in the same order, so a decode step
    (1 row a head) and a verify step (lq rows a head) give every row the same bits: row r
    of the verify step is the decode step at length L - lq + r + 1."""
    need_kernel_dtype(torch.device("cpu"), dtype)
    b, hkv, d, cap = 2, 3, 80, 70
    lengths = [70, 41]
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    q = randn((b, lq, hkv, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        many, lse_many = ops.decode_attention(q, kc, vc, seqlens, return_lse=True)
        _rows_equal_single_queries(q, kc, vc, seqlens, many, lse_many)
    finally:
        torch.set_num_threads(before)


def _rows_equal_single_queries(q, kc, vc, seqlens, out, lse):
    """Row r of a call with lq query rows a head has the bits of a call with row r alone
    at length L - lq + r + 1 (a decode step)."""
    lq = q.shape[1]
    for r in range(lq):
        one, lse_one = ops.decode_attention(q[:, r:r + 1].contiguous(), kc, vc,
                                            seqlens - (lq - 1 - r), return_lse=True)
        assert torch.equal(one[:, 0], out[:, r]), r
        assert torch.equal(lse_one[..., 0], lse[..., r]), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lq", [1, 5, 13])
def test_decode_attention_across_softmax_blocks(dtype, lq):
    """The CPU kernel takes its softmax max and sum once per block of 128 keys: query rows
    whose last visible key falls on either side of a block boundary (127/128, 255/256), a
    block whose keys score far above the earlier ones (the accumulators rescaled) and a
    first block that outweighs the later ones (their p far below 1, no rescale), against
    the reference, and row for row the bits of single-query calls."""
    need_kernel_dtype(torch.device("cpu"), dtype)
    b, hkv, d, cap = 4, 2, 64, 300
    lengths = [128 + lq // 2, 256 + lq // 2, 129, 300]
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    q = randn((b, lq, hkv, d), dtype)
    kc[1, 128:256] *= 8  # a later block outweighs the first: rescaled when it arrives
    kc[3, :128] *= 8  # the first block outweighs the later ones: m never grows after it
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, lse = ops.decode_attention(q, kc, vc, seqlens, return_lse=True)
        check_decode(out, lse, q, kc, vc, seqlens, None, what=f"lengths {lengths}")
        _rows_equal_single_queries(q, kc, vc, seqlens, out, lse)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_attention_merge_and_append_in_chunks(dtype):
    """A GQA verify step over many sequences at 2 threads: the split merge (rows x head_dim
    small enough to hand groups to the helper threads in chunks) and the cache write of
    many rows, against the reference."""
    need_kernel_dtype(torch.device("cpu"), dtype)
    b, hkv, g, d, lq, cap = 8, 8, 4, 64, 5, 90
    lengths = mixed_lengths(b, cap, lq)
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    q = randn((b, lq, hkv * g, d), dtype)
    k_new, v_new = randn((b, 40, hkv, d), dtype), randn((b, 40, hkv, d), dtype)
    start = torch.zeros(b, dtype=torch.int32)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kw, vw = kc.clone(), vc.clone()
        ops.kv_cache_append(kw, vw, k_new, v_new, start)
        out, lse = ops.decode_attention(q, kc, vc, seqlens, return_lse=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(kw[:, :40], k_new) and torch.equal(vw[:, :40], v_new)
    for after, was in ((kw, kc), (vw, vc)):  # the rest untouched (NaN poison included)
        torch.testing.assert_close(after[:, 40:], was[:, 40:], rtol=0, atol=0, equal_nan=True)
    check_decode(out, lse, q, kc, vc, seqlens, None, what=f"lengths {lengths}")
