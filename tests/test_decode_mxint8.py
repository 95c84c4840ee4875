"""Decoding over an MXINT8 cache (int8 mantissas, one exponent per 32 elements of
head_dim): the attention of the dequantised cache, close to that of the float cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import need_kernel_dtype, randn
from helpers.decode import (
    EXP_POISON,
    MANT_POISON,
    as_bfp,
    check_decode,
    head_dim_on,
    mixed_lengths,
    rel_err,
    to_paged,
)

from llmcore import ops
from llmcore import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


MX_CASES = [(torch.float32, 80, 1), (torch.bfloat16, 128, 4), (torch.float16, 64, 16)]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("mx_case", MX_CASES, ids=lambda c: f"{c[0]}_d{c[1]}_q{c[2]}")
def test_decode_attention_mxint8(device, isa, mx_case, paged):
    """Over an MXINT8 cache: the attention of the dequantised cache (to the precision of q's
    dtype), and within the quantisation error of the same attention over the float cache."""
    dtype, d, lq = mx_case
    need_kernel_dtype(device, dtype)
    b, hkv, g, cap, d = 5, 2, 4, 129, head_dim_on(device, d)
    lengths = mixed_lengths(b, cap, lq)
    kf = randn((b, cap, hkv, d), torch.float32)
    vf = randn((b, cap, hkv, d), torch.float32)
    (km, ke), (vm, ve) = (ref.bfp_quantize(t, 8, 32, False) for t in (kf, vf))
    for i, n in enumerate(lengths):
        for t in (km, vm):
            t[i, n:] = MANT_POISON
        for t in (ke, ve):
            t[i, n:] = EXP_POISON
    q = randn((b, lq, hkv * g, d), dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    table = None
    if paged:
        (km, ke, vm, ve), table = to_paged(
            [km, ke, vm, ve], lengths, 16, [MANT_POISON, EXP_POISON] * 2)
    kb = as_bfp(km.to(device), ke.to(device), dtype)
    vb = as_bfp(vm.to(device), ve.to(device), dtype)
    out, lse = ops.decode_attention(q.to(device), kb, vb, seqlens.to(device),
                                    block_table=None if table is None else table.to(device),
                                    return_lse=True)
    what = f"d {d}, q_len {lq}, lengths {lengths}"
    check_decode(out, lse, q, km, vm, seqlens, None, table, ke, ve, what=what)
    # against attention over the unquantised cache
    o_float, _ = ref.decode_attention(q.double(), kf, vf, seqlens, 1 / math.sqrt(d),
                                      upcast=True)
    seen = (seqlens.long().unsqueeze(1) - lq + torch.arange(lq)) >= 0
    assert rel_err(out.cpu()[seen], o_float[seen]) < 2e-2, what

