"""``models.KVCache``: prefill and decode steps against dense causal attention, rollback,
reset, the page pool, MXINT8 storage and its size.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DTYPES, check_2x, randn
from helpers.decode import (
    head_dim_on,
    rel_err,
)

from llmcore import ops
from llmcore import reference as ref
from llmcore.models import KVCache

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


def dense_check(out, q, ks, vs, dtype, mx: bool, what: str, scale=None):
    """out [1, T, H, D] against causal attention of q over all tokens ks/vs [1, S, Hkv, D]
    (MXINT8 storage: over their quantised values)."""
    if mx:
        ks, vs = (ref.bfp_dequantize(*ref.bfp_quantize(t, 8, 32, False), 8, 32, t.shape[-1],
                                     torch.float64) for t in (ks, vs))
    q, ks, vs = q.cpu(), ks.cpu(), vs.cpu()
    o64, _ = ref.attention_fwd(q.double(), ks.double(), vs.double(), causal=True,
                               softmax_scale=scale)
    pt, _ = ref.attention_fwd(q, ks.to(dtype), vs.to(dtype), causal=True, softmax_scale=scale,
                              upcast=False)
    pt32, _ = ref.attention_fwd(q.float(), ks.float(), vs.float(), causal=True,
                                softmax_scale=scale, upcast=False)
    check_2x(out, o64, [pt, pt32.to(dtype)], dtype, what)


KV_CONFIGS = [("native", torch.float32, None), ("native", torch.bfloat16, 7),
              ("native", torch.float16, None), ("mxint8", torch.float32, None),
              ("mxint8", torch.bfloat16, 4)]


def kv_config(device, storage, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.float16
    return storage, dtype


@pytest.mark.parametrize("storage,dtype,page_size", KV_CONFIGS, ids=str)
def test_kvcache_prefill_decode_matches_dense(device, storage, dtype, page_size):
    storage, dtype = kv_config(device, storage, dtype)
    n_layers, b, hkv, g, d, max_seq = 2, 3, 2, 4, head_dim_on(device, 80), 40
    cache = KVCache(n_layers, b, max_seq, hkv, d, dtype, device, storage, page_size)
    ks = [[] for _ in range(n_layers)]
    vs = [[] for _ in range(n_layers)]
    total = 0
    for t in (6, 1, 16):
        pos = cache.prepare(t)
        assert torch.equal(pos.cpu(), (total + torch.arange(t)).expand(b, t)), "positions"
        for layer in range(n_layers):
            k, v = randn((b, t, hkv, d), dtype), randn((b, t, hkv, d), dtype)
            q = randn((b, t, hkv * g, d), dtype)
            ks[layer].append(k)
            vs[layer].append(v)
            cache.append(layer, k.to(device), v.to(device))
            out = cache.attend(layer, q.to(device))
            assert out.dtype == dtype and out.shape == q.shape
            kall, vall = torch.cat(ks[layer], 1), torch.cat(vs[layer], 1)
            dense_check(out, q, kall, vall, dtype, storage == "mxint8",
                        f"step of {t} at {total}, layer {layer}")
            if storage == "native" and dtype == torch.float32:
                dense = ops.attention(q.to(device), kall.to(device), vall.to(device),
                                      causal=True)
                torch.testing.assert_close(out, dense, rtol=0, atol=4e-5)
        assert cache.lengths == [total] * b, "lengths change only at commit"
        cache.commit()
        total += t
        assert cache.lengths == [total] * b
        assert cache.seqlens.tolist() == [total] * b and cache.seqlens.dtype == torch.int32


def run_steps(cache, steps):
    """Feed (k, v, q) per layer per step; returns the attend outputs of the last step."""
    outs = None
    for step in steps:
        cache.prepare(step[0][0].shape[1])
        outs = []
        for layer, (k, v, q) in enumerate(step):
            cache.append(layer, k, v)
            outs.append(cache.attend(layer, q))
        cache.commit()
    return outs


def make_step(n_layers, b, t, hkv, g, d, dtype, device):
    return [tuple(randn((b, t, h, d), dtype, device) for h in (hkv, hkv, hkv * g))
            for _ in range(n_layers)]


def take(step, lo, hi):
    return [tuple(x[:, lo:hi] for x in layer) for layer in step]


@pytest.mark.parametrize("storage,dtype,page_size", KV_CONFIGS, ids=str)
def test_kvcache_rollback_equals_never_appended(device, storage, dtype, page_size):
    storage, dtype = kv_config(device, storage, dtype)
    n_layers, b, hkv, g, d, max_seq = 2, 3, 2, 4, 64, 32
    args = (n_layers, b, max_seq, hkv, d, dtype, device, storage, page_size)
    prefill = make_step(n_layers, b, 9, hkv, g, d, dtype, device)
    draft = make_step(n_layers, b, 4, hkv, g, d, dtype, device)
    nxt = make_step(n_layers, b, 3, hkv, g, d, dtype, device)
    a = KVCache(*args)
    run_steps(a, [prefill, draft])
    a.rollback(11)  # keep the first 2 draft tokens
    assert a.lengths == [11] * b
    out_a = run_steps(a, [nxt])
    never = KVCache(*args)
    out_b = run_steps(never, [prefill, take(draft, 0, 2), nxt])
    for layer in range(n_layers):
        assert torch.equal(out_a[layer], out_b[layer]), f"layer {layer}"
    # reset, then the same stream as a fresh cache
    a.reset()
    assert a.lengths == [0] * b and a.seqlens.tolist() == [0] * b
    out_r = run_steps(a, [prefill, take(draft, 0, 2), nxt])
    for layer in range(n_layers):
        assert torch.equal(out_r[layer], out_b[layer]), f"after reset, layer {layer}"


@pytest.mark.parametrize("storage,dtype,page_size", KV_CONFIGS, ids=str)
def test_kvcache_rollback_per_sequence(device, storage, dtype, page_size):
    storage, dtype = kv_config(device, storage, dtype)
    n_layers, b, hkv, g, d, max_seq = 2, 3, 2, 4, 64, 32
    cache = KVCache(n_layers, b, max_seq, hkv, d, dtype, device, storage, page_size)
    prefill = make_step(n_layers, b, 9, hkv, g, d, dtype, device)
    draft = make_step(n_layers, b, 4, hkv, g, d, dtype, device)
    nxt = make_step(n_layers, b, 2, hkv, g, d, dtype, device)
    run_steps(cache, [prefill, draft])
    keep = [10, 13, 9]  # accept 1, 4 and 0 draft tokens
    cache.rollback(torch.tensor(keep))
    assert cache.lengths == keep and cache.seqlens.tolist() == keep
    out = run_steps(cache, [nxt])
    assert cache.lengths == [n + 2 for n in keep]
    for layer in range(n_layers):
        for i, n in enumerate(keep):
            ks = torch.cat([prefill[layer][0][i:i + 1], draft[layer][0][i:i + 1, : n - 9],
                            nxt[layer][0][i:i + 1]], 1)
            vs = torch.cat([prefill[layer][1][i:i + 1], draft[layer][1][i:i + 1, : n - 9],
                            nxt[layer][1][i:i + 1]], 1)
            dense_check(out[layer][i:i + 1], nxt[layer][2][i:i + 1], ks, vs, dtype,
                        storage == "mxint8", f"layer {layer}, sequence {i} kept {n}")


def test_kvcache_misuse_errors():
    cache = KVCache(2, 2, 16, 1, 32)
    k = torch.randn(2, 1, 1, 32)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.append(0, k, k)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.attend(0, k)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.prepare(17)
    cache.prepare(8)
    with pytest.raises(RuntimeError, match="commit"):
        cache.prepare(1)
    with pytest.raises(ValueError, match="layer"):
        cache.append(2, torch.randn(2, 8, 1, 32), torch.randn(2, 8, 1, 32))
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, k, k)
    with pytest.raises(RuntimeError, match="commit"):
        cache.rollback(0)
    cache.commit()
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.prepare(9)
    with pytest.raises(ValueError, match="rollback length of sequence 1"):
        cache.rollback([8, 9])
    with pytest.raises(ValueError, match="lengths"):
        cache.rollback([1, 2, 3])
    with pytest.raises(ValueError, match="storage"):
        KVCache(1, 1, 8, 1, 32, storage="fp8")
    with pytest.raises(ValueError, match="num_pages"):
        KVCache(1, 1, 8, 1, 32, num_pages=3)


def used_pages(cache) -> list[list[int]]:
    bt = cache.block_table.cpu()
    return [bt[i, : -(-n // cache.page_size)].tolist() for i, n in enumerate(cache.lengths)]


def test_kvcache_page_pool(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    cache = KVCache(2, 2, 16, 1, 64, dtype, device, page_size=4, num_pages=5)
    step = make_step(2, 2, 8, 1, 2, 64, dtype, device)
    run_steps(cache, [step])  # 2 + 2 pages
    pages = used_pages(cache)
    assert len(set(pages[0] + pages[1])) == 4 and all(0 <= p < 5 for p in pages[0] + pages[1])
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(4)  # needs 2 more, 1 free
    assert cache.lengths == [8, 8]
    cache.rollback([4, 8])  # sequence 0 gives a page back
    run_steps(cache, [make_step(2, 2, 4, 1, 2, 64, dtype, device)])  # needs 2: fits now
    pages = used_pages(cache)
    assert len(set(pages[0] + pages[1])) == 5, f"pages shared between sequences: {pages}"
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(1)
    cache.reset()
    assert cache.lengths == [0, 0]
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(16)  # 8 pages > 5
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(9)  # 3 + 3 pages > 5
    assert cache.lengths == [0, 0]
    run_steps(cache, [make_step(2, 2, 8, 1, 2, 64, dtype, device)])  # 2 + 2 pages


def test_kvcache_page_pool_reset_returns_pages(device):
    dtype = KERNEL_DTYPES[device.type][-1]
    cache = KVCache(1, 2, 32, 1, 64, dtype, device, page_size=4, num_pages=6)
    for _ in range(3):  # without returning pages the second round runs out
        run_steps(cache, [make_step(1, 2, 12, 1, 2, 64, dtype, device)])
        assert len({p for s in used_pages(cache) for p in s}) == 6
        cache.reset()
    run_steps(cache, [make_step(1, 2, 12, 1, 2, 64, dtype, device)])
    cache.rollback([1, 12])
    run_steps(cache, [make_step(1, 2, 4, 1, 2, 64, dtype, device)])  # 2 + 4 pages: fits
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.prepare(1)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
def test_kvcache_mxint8_close_to_native(device, page_size):
    dtype = KERNEL_DTYPES[device.type][-1]
    n_layers, b, hkv, g, d = 2, 2, 2, 4, 128
    native = KVCache(n_layers, b, 64, hkv, d, dtype, device, "native", page_size)
    mx = KVCache(n_layers, b, 64, hkv, d, dtype, device, "mxint8", page_size)
    for t in (37, 1, 4):
        step = make_step(n_layers, b, t, hkv, g, d, dtype, device)
        for layer, (o_n, o_m) in enumerate(zip(run_steps(native, [step]), run_steps(mx, [step]),
                                               strict=True)):
            assert rel_err(o_m, o_n) < 2e-2, f"step {t}, layer {layer}"


@pytest.mark.parametrize("page_size", [None, 8])
def test_kvcache_nbytes(page_size):
    for dtype, bytes_per in ((torch.float16, 16), (torch.bfloat16, 16), (torch.float32, 32)):
        native = KVCache(3, 2, 64, 2, 128, dtype, "cpu", "native", page_size)
        mx = KVCache(3, 2, 64, 2, 128, dtype, "cpu", "mxint8", page_size)
        assert native.nbytes() * 8.25 == mx.nbytes() * bytes_per, (dtype, native.nbytes(),
                                                                   mx.nbytes())

