"""Decoding ops under torch.library and torch.compile: opcheck of decode_attention and
kv_cache_append (schema, fake tensors, in-place aliasing) and a compiled call.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DTYPES, randn
from helpers.decode import (
    float_cache,
    mx_cache,
    to_paged,
)

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


def _decode_samples(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    b, hkv, g, d, cap = 3, 2, 4, 64, 40
    lengths = [0, 17, 40]
    kc, vc = (c.to(device) for c in float_cache(b, cap, hkv, d, dtype, lengths))
    q = randn((b, 4, hkv * g, d), dtype, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    (km, ke), (vm, ve) = mx_cache(b, cap, hkv, d, lengths)
    (pk, pv), table = to_paged([kc.cpu(), vc.cpu()], lengths, 16, [float("nan")] * 2)
    mx = [t.to(device) for t in (km, vm, ke, ve)]
    return [
        (q, kc, vc, seqlens, 0.125, None, None, None),
        (q[:, :1], pk.to(device), pv.to(device), seqlens, 0.3, table.to(device), None, None),
        (q, mx[0], mx[1], seqlens, 0.125, None, mx[2], mx[3]),
    ]


def test_opcheck_decode_attention(device):
    for args in _decode_samples(device):
        torch.library.opcheck(torch.ops.llmcore.decode_attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_opcheck_kv_cache_append(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    b, hkv, d, cap, t = 3, 2, 64, 40, 5
    start = torch.tensor([0, 7, 35], dtype=torch.int32, device=device)
    k, v = (randn((b, t, hkv, d), dtype, device) for _ in range(2))
    kc, vc = (randn((b, cap, hkv, d), dtype, device) for _ in range(2))
    km, vm = (torch.zeros((b, cap, hkv, d), dtype=torch.int8, device=device) for _ in range(2))
    ke, ve = (torch.zeros((b, cap, hkv, 2), dtype=torch.uint8, device=device)
              for _ in range(2))
    (pk, pv), table = to_paged([kc.cpu(), vc.cpu()], [cap] * b, 8, [float("nan")] * 2)
    for args in ((kc, vc, k, v, start, None, None, None),
                 (pk.to(device), pv.to(device), k, v, start, table.to(device), None, None),
                 (km, vm, k, v, start, None, ke, ve)):
        torch.library.opcheck(torch.ops.llmcore.kv_cache_append.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    schema = torch.ops.llmcore.kv_cache_append.default._schema
    written = {a.name: a.is_write for a in schema.arguments if a.alias_info is not None}
    assert written == {"k_cache": True, "v_cache": True, "k_exponent": True,
                       "v_exponent": True}, written


def test_torch_compile_decode(device):
    torch._dynamo.reset()
    samples = _decode_samples(device)

    def f(q, kc, vc, seqlens, scale, table, ke, ve):
        out, lse = torch.ops.llmcore.decode_attention(q, kc, vc, seqlens, scale, table, ke, ve)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True)
    for args in samples[:2]:
        e_out, e_lse = f(*args)
        c_out, c_lse = compiled(*args)
        torch.testing.assert_close(c_out, e_out, rtol=0, atol=0)
        torch.testing.assert_close(c_lse, e_lse, rtol=0, atol=0)

