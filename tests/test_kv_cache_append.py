"""``ops.kv_cache_append``: exactly the right slots are written (bit for bit, MXINT8
quantisation edge cases included) and nothing else.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DTYPES, need_kernel_dtype, randn, randn_blocks
from helpers.decode import (
    EXP_POISON,
    MANT_POISON,
    as_bfp,
    bits,
    float_cache,
    head_dim_on,
    to_paged,
)

from llmcore import ops
from llmcore import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


def tie_data(b, t, hkv, d, dtype) -> torch.Tensor:
    """New tokens with quantisation edge cases: ties (x.5 mantissas), values that round up
    to 128 (clamped to 127), an all-zero block, negative ties."""
    x = randn_blocks((b, t, hkv, d), 32, log2_range=(-6.0, 6.0)).double()
    x[..., 0, :, :32] = 1.5  # block max in [1, 2): scale 2^6, step 1/64
    steps = torch.arange(32, dtype=torch.float64)
    x[..., 0, 0, 1:32] = ((steps[1:] % 13) - 6 + 0.5) / 64  # exact ties, both signs
    if t > 1:
        x[:, 1, 0, :32] = 1.999  # 127.94 -> 128 -> clamped to 127
        x[:, 1, -1, :32] = 0.0  # an all-zero block
    return x.to(dtype)


APPEND_STORAGES = [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                   ("float16", torch.float16), ("mxint8", torch.float32),
                   ("mxint8", torch.bfloat16), ("mxint8", torch.float16)]


@pytest.mark.parametrize("t", [1, 16])
@pytest.mark.parametrize("page_size", [None, 1, 7], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("storage,dtype", APPEND_STORAGES, ids=lambda x: str(x))
def test_kv_cache_append_exact(device, isa, storage, dtype, page_size, t):
    need_kernel_dtype(device, dtype)
    if isa == "scalar" and storage != "mxint8":
        pytest.skip("a float cache write is a copy on every path")
    b, hkv, cap = 4, 3, 37
    d = head_dim_on(device, 80 if t == 1 else 64)
    starts = [0, cap - t, int(torch.randint(0, cap - t + 1, ())),
              int(torch.randint(0, cap - t + 1, ()))]
    mx = storage == "mxint8"
    if mx:
        k = tie_data(b, t, hkv, d, dtype)
        v = randn_blocks((b, t, hkv, d), 32, dtype, log2_range=(-10.0, 10.0))
    else:
        k = randn((b, t, hkv, d), dtype)
        v = randn((b, hkv, t, d), dtype).transpose(1, 2)  # non-contiguous
    ecols = -(-d // 32)
    if mx:
        parts = [torch.full((b, cap, hkv, d), MANT_POISON, dtype=torch.int8),
                 torch.full((b, cap, hkv, ecols), EXP_POISON, dtype=torch.uint8)] * 2
        parts = [p.clone() for p in parts]
        poisons = [MANT_POISON, EXP_POISON] * 2
    else:
        parts = [torch.full((b, cap, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
        poisons = [float("nan")] * 2
    table = None
    if page_size is not None:
        parts, table = to_paged(parts, [cap] * b, page_size, poisons)
    # the expected bytes, written by hand
    expected = [p.clone() for p in parts]
    new = [*ref.bfp_quantize(k, 8, 32, False), *ref.bfp_quantize(v, 8, 32, False)] if mx \
        else [k, v]
    for i, s in enumerate(starts):
        for j in range(t):
            pos = s + j
            if table is None:
                idx = (i, pos)
            else:
                idx = (int(table[i, pos // page_size]), pos % page_size)
            for e, n in zip(expected, new, strict=True):
                e[idx] = n[i, j]
    dev = [p.to(device) for p in parts]
    if mx:
        caches = (as_bfp(dev[0], dev[1], dtype), as_bfp(dev[2], dev[3], dtype))
    else:
        caches = tuple(dev)
    ops.kv_cache_append(*caches, k.to(device), v.to(device),
                        torch.tensor(starts, dtype=torch.int32, device=device),
                        None if table is None else table.to(device))
    names = ["k mantissa", "k exponent", "v mantissa", "v exponent"] if mx else ["k", "v"]
    for name, a, e in zip(names, dev, expected, strict=True):
        ab, eb = bits(a), bits(e)
        if not torch.equal(ab, eb):
            diff = (ab != eb).reshape(*e.shape, -1).any(-1).nonzero()[:5].tolist()
            raise AssertionError(f"{name} cache: bytes differ at {diff} (start_pos {starts}, "
                                 f"T {t}); first: got {a.cpu()[tuple(diff[0])].tolist()}, "
                                 f"want {e[tuple(diff[0])].tolist()}")


def test_kv_cache_append_then_decode(device):
    """Appending the new tokens then decoding = decoding over a cache that already held them."""
    dtype = KERNEL_DTYPES[device.type][-1]
    b, hkv, g, d, cap, lq = 3, 2, 4, 64, 50, 4
    lengths = [4, 23, 50]
    kc, vc = float_cache(b, cap, hkv, d, dtype, lengths)
    k_new = torch.stack([kc[i, n - lq:n] for i, n in enumerate(lengths)])
    v_new = torch.stack([vc[i, n - lq:n] for i, n in enumerate(lengths)])
    kc2, vc2 = kc.clone(), vc.clone()
    for i, n in enumerate(lengths):
        kc2[i, n - lq:] = float("nan")
        vc2[i, n - lq:] = float("nan")
    kc2, vc2 = kc2.to(device), vc2.to(device)
    start = torch.tensor([n - lq for n in lengths], dtype=torch.int32, device=device)
    ops.kv_cache_append(kc2, vc2, k_new.to(device), v_new.to(device), start)
    q = randn((b, lq, hkv * g, d), dtype, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    a = ops.decode_attention(q, kc2, vc2, seqlens, return_lse=True)
    e = ops.decode_attention(q, kc.to(device), vc.to(device), seqlens, return_lse=True)
    assert torch.equal(a[0], e[0]) and torch.equal(a[1], e[1])

