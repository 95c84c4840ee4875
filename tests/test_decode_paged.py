"""Paged KV caches: ``ops.decode_attention`` with a block table gives the contiguous
result bit for bit, and the reference's to the 2x rule (see tests/helpers/decode.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import need_kernel_dtype, randn
from helpers.decode import (
    EXP_POISON,
    MANT_POISON,
    as_bfp,
    check_decode,
    float_cache,
    head_dim_on,
    mixed_lengths,
    mx_cache,
    to_paged,
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
        if storage == "mxint8":
            (km, ke), (vm, ve) = mx_cache(b, cap, hkv, d, lengths)
            parts = [km, ke, vm, ve]
            poisons = [MANT_POISON, EXP_POISON, MANT_POISON, EXP_POISON]
        else:
            parts = float_cache(b, cap, hkv, d, dtype, lengths)
            poisons = [float("nan")] * 2
        paged, table = to_paged(parts, lengths, page_size, poisons)
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

