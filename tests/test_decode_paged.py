"""Paged KV caches: ``ops.decode_attention`` with a block table gives the contiguous
result bit for bit, and the reference's to the 2x rule (see tests/helpers/decode.py); page
ids out of range (validate=False) are absent keys.
"""

from __future__ import annotations

import pytest
import torch
from helpers import need_kernel_dtype, randn
from helpers.decode import (
    as_bfp,
    check_decode,
    drop_positions,
    head_dim_on,
    mixed_lengths,
    paged_cache,
)

from llmcore import ops

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "mxint8"])
def test_paged_equals_contiguous(device, storage, page_size):
    dtype = torch.float32 if storage == "mxint8" else getattr(torch, storage)
    if storage == "mxint8" and device.type == "cuda":
        dtype = torch.float16
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, cap = 5, 2, 4, head_dim_on(device, 80), 300
    for lq in ((4,) if page_size in (1, 16) else (1,)):
        lengths = mixed_lengths(b, cap, lq)
        q = randn((b, lq, hkv * g, d), dtype).to(device)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        parts, paged, table, _ = paged_cache(b, cap, hkv, d, dtype, lengths, page_size, storage)
        parts = [p.to(device) for p in parts]
        paged = [p.to(device) for p in paged]
        if storage == "mxint8":
            cont_args = (as_bfp(*parts[:2], dtype), as_bfp(*parts[2:], dtype))
            paged_args = (as_bfp(*paged[:2], dtype), as_bfp(*paged[2:], dtype))
        else:
            cont_args, paged_args = tuple(parts), tuple(paged)
        out_c, lse_c = ops.decode_attention(q, *cont_args, seqlens, return_lse=True)
        out_p, lse_p = ops.decode_attention(q, *paged_args, seqlens, block_table=table.to(device),
                                            return_lse=True)
        what = f"page_size {page_size}, q_len {lq}, lengths {lengths}"
        assert torch.equal(out_p, out_c), f"{what}: paged out != contiguous out " \
            f"(max diff {(out_p.double() - out_c.double()).abs().nan_to_num(1e300).max():.3e})"
        assert torch.equal(lse_p, lse_c), f"{what}: paged lse != contiguous lse"
        if storage == "mxint8":
            check_decode(out_p, lse_p, q, paged[0], paged[2], seqlens, None, table,
                         paged[1], paged[3], what=what)
        else:
            check_decode(out_p, lse_p, q, *paged, seqlens, None, table, what=what)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("storage", ["float", "mxint8"])
def test_out_of_range_page_ids_are_absent_keys(device, storage, q_len):
    """validate=False with a block table entry outside [0, num_pages) (past the end, and
    -1): that page's positions are absent keys, excluded from the softmax (not scored 0,
    which would add exp(0 - max) to the denominator and scale the output down). Compared
    with the reference over the cache with those positions removed (the dropped pages
    come before each sequence's last q_len positions, so the causal limits are the same)."""
    # q fp16 (the CUDA MXINT8 path's q dtype); fp32 for MXINT8 on the CPU, as above
    dtype = torch.float32 if storage == "mxint8" and device.type == "cpu" else torch.float16
    need_kernel_dtype(device, dtype)
    b, hkv, g, d, cap, page_size = 2, 2, 4, head_dim_on(device, 80), 64, 16
    lengths = [50, 45]
    bad_slots = [1, 0]  # slot 1 of sequence 0 (positions 16..31), slot 0 of sequence 1
    drops = [range(s * page_size, (s + 1) * page_size) for s in bad_slots]
    q = randn((b, q_len, hkv * g, d), dtype).to(device)
    parts, paged, table, poisons = paged_cache(b, cap, hkv, d, dtype, lengths, page_size, storage)
    num_pages = paged[0].shape[0]
    table[0, bad_slots[0]] = num_pages + 3
    table[1, bad_slots[1]] = -1
    dropped = [drop_positions(p, lengths, drops, poison)
               for p, poison in zip(parts, poisons, strict=True)]
    kept_lengths = dropped[0][1]
    dropped = [t for t, _ in dropped]
    paged = [p.to(device) for p in paged]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    kept = torch.tensor(kept_lengths, dtype=torch.int32, device=device)
    what = f"{storage}, q_len {q_len}, page ids {num_pages + 3} and -1"
    if storage == "mxint8":
        args = (as_bfp(*paged[:2], dtype), as_bfp(*paged[2:], dtype))
    else:
        args = tuple(paged)
    with pytest.raises(ValueError):  # validated: the bad ids are an error
        ops.decode_attention(q, *args, seqlens, block_table=table.to(device))
    out, lse = ops.decode_attention(q, *args, seqlens, block_table=table.to(device),
                                    return_lse=True, validate=False)
    if storage == "mxint8":
        check_decode(out, lse, q, dropped[0], dropped[2], kept, None, None, dropped[1],
                     dropped[3], what=what)
    else:
        check_decode(out, lse, q, *dropped, kept, None, what=what)
