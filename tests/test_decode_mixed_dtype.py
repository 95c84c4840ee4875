"""A float KV cache in another float dtype than the new tokens (an fp32 model with a
16-bit cache, as llama.cpp's F16 cache): the ops round k/v into the cache's dtype as they
write it and attend with q in its own dtype (docs/decode.md), and KVCache/Transformer take
``storage="bfloat16" | "float16" | "float32"``."""

from __future__ import annotations

import pytest
import torch
from helpers import randn
from helpers.decode import check_decode, float_cache, mixed_lengths

from llmcore import ops
from llmcore import reference as ref
from llmcore.models import KVCache, Transformer, TransformerConfig

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
MIXED = [(q, c) for q in FLOATS for c in FLOATS if q != c]


@pytest.mark.parametrize("q_dtype,cache_dtype", MIXED, ids=str)
@pytest.mark.parametrize("lq", [1, 5])
def test_decode_attention_mixed(q_dtype, cache_dtype, lq):
    torch.manual_seed(0)
    b, hkv, g, d, cap = 3, 2, 3, 80, 41
    lengths = mixed_lengths(b, cap, lq)
    kc, vc = float_cache(b, cap, hkv, d, cache_dtype, lengths)
    q = randn((b, hkv * g, lq, d), q_dtype).transpose(1, 2)  # strided q
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = ops.decode_attention(q, kc, vc, seqlens, return_lse=True)
    # the reference sees the cache's values as stored (exactly representable in fp64)
    check_decode(out, lse, q, kc, vc, seqlens, None, what=f"{q_dtype} over {cache_dtype}")


@pytest.mark.parametrize("k_dtype,cache_dtype", MIXED, ids=str)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("path", ["best", "scalar"])
def test_kv_cache_append_rounds_to_the_cache(k_dtype, cache_dtype, paged, path, monkeypatch):
    """Bit for bit the reference's rounding, on the vector (AVX-512) and scalar paths, with
    NaN, Inf, overflow and values that are subnormal in the cache's dtype."""
    if path == "scalar":
        monkeypatch.setenv("LLMCORE_CPU_ISA", "scalar")
    torch.manual_seed(1)
    b, t, hkv, d, cap = 2, 3, 2, 48, 12
    kc = torch.zeros(b, cap, hkv, d, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    k, v = randn((b, t, hkv, d), k_dtype) * 300, randn((b, t, hkv, d), k_dtype)
    k[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 7e4])
    k[0, 0, 1, :4] = torch.tensor([1e-6, -3e-8, 6.1e-5, 2e-39])  # fp16 (bf16) subnormals
    start = torch.tensor([0, 5], dtype=torch.int32)
    table = None
    if paged:  # pages of 4 positions, in reverse order
        kc, vc = kc.reshape(b * cap // 4, 4, hkv, d), vc.reshape(b * cap // 4, 4, hkv, d)
        table = torch.arange(b * cap // 4 - 1, -1, -1, dtype=torch.int32).reshape(b, -1)
    ops.kv_cache_append(kc, vc, k, v, start, table)
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    ref.kv_cache_append(rk, rv, k, v, start, table)  # writes new.to(cache dtype)
    # exact, NaN payloads aside
    torch.testing.assert_close(kc, rk, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, rv, rtol=0, atol=0, equal_nan=True)
    assert kc.isnan().sum() == 1  # 7e4 overflows float16
    assert kc.isinf().sum() == 2 + (torch.float16 in (k_dtype, cache_dtype))


def test_non_float_cache_is_refused():
    q = torch.randn(1, 1, 2, 32)
    kc = torch.zeros(1, 4, 2, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ops.decode_attention(q, kc, kc, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        torch.ops.llmcore.decode_attention(q, kc, kc, torch.tensor([1], dtype=torch.int32),
                                           0.5, None, None, None)


def test_kvcache_storage_dtype():
    c = KVCache(2, 1, 8, 2, 32, dtype=torch.float32, storage="bfloat16")
    assert c.k_values.dtype == torch.bfloat16 and c.dtype == torch.float32
    assert c.nbytes() == 2 * 2 * 8 * 2 * 32 * 2
    with pytest.raises(ValueError, match="storage must be one of"):
        KVCache(2, 1, 8, 2, 32, storage="int8")


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant", [None, "mxint8"])
def test_model_with_a_16_bit_cache(storage, quant):
    """An fp32 model decoding over a 16-bit cache: close to the fp32 cache (k/v rounded
    once), the one-op step bit for bit the Python chain, and the torch backend agrees."""
    torch.manual_seed(2)
    cfg = TransformerConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=160,
                            vocab_size=211, max_seq_len=64)
    model = Transformer(cfg).eval()
    if quant:
        model.quantize(quant)
    ids = torch.randint(0, 211, (2, 24))

    def run(storage, chain=False, backend="llmcore"):
        model.backend = backend
        if chain:
            model._decoder_layers = lambda *a: None
        try:
            cache = model.new_cache(2, 32, storage=storage)
            with torch.inference_mode():
                out = [model(ids[:, :16], cache=cache, prefill=True)]
                out += [model(ids[:, 16:17], cache=cache), model(ids[:, 17:22], cache=cache),
                        model(ids[:, 22:23], cache=cache)]
            return torch.cat(out, 1)
        finally:
            model.backend = "llmcore"
            model.__dict__.pop("_decoder_layers", None)

    half = run(storage)
    assert torch.equal(half, run(storage, chain=True))
    full = run("native")
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    assert not torch.equal(half, full)  # the cache really is rounded
    if quant is None:
        torch.testing.assert_close(run(storage, backend="torch"), half, rtol=1e-4, atol=1e-4)
