"""Host memory in 2 MB pages (llmcore.ops.memory, csrc/common/hugepages_binding.cpp): the arena and
its views, packing tensors and models in place, and the KV cache's arena."""

from __future__ import annotations

import copy

import pytest
import torch

from llmcore import _ext
from llmcore.models import Transformer, TransformerConfig
from llmcore.ops import memory

pytestmark = pytest.mark.skipif(not _ext.has_op("hugepage_arena"),
                                reason="needs the compiled extension")
HUGE = 2 << 20


def _mappings() -> list[tuple[int, int, set[str]]]:
    """(start, end, VmFlags) of every mapping of this process (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                cur = [lo, hi, set()]
                out.append(cur)
            elif head == "VmFlags:" and cur is not None:
                cur[2] = set(line.split()[1:])
    return [tuple(m) for m in out]


def _advised(tensors) -> bool:
    """Whether every tensor's data lies in a mapping advised MADV_HUGEPAGE ('hg')."""
    maps = _mappings()
    for t in tensors:
        p = t.data_ptr()
        if not any(lo <= p < hi and "hg" in flags for lo, hi, flags in maps):
            return False
    return True


linux_thp = pytest.mark.skipif(not memory.hugepages_enabled(),
                               reason="transparent huge pages off (or not Linux)")


# ---- the two ops ----------------------------------------------------------------------------
def test_arena_is_zeroed_aligned_and_advised():
    a = torch.ops.llmcore.hugepage_arena(3 * HUGE + 123)
    assert a.dtype == torch.uint8 and a.shape == (3 * HUGE + 123,) and a.is_contiguous()
    assert a.data_ptr() % HUGE == 0
    assert not a.any()
    a[-1] = 7  # the last byte is writable
    assert int(a[-1]) == 7
    if memory.hugepages_enabled():
        assert _advised([a])
    assert torch.ops.llmcore.hugepage_arena(0).shape == (0,)


def test_arena_rejects_bad_sizes():
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        torch.ops.llmcore.hugepage_arena(-1)
    with pytest.raises(ValueError, match="beyond any machine"):
        torch.ops.llmcore.hugepage_arena(1 << 60)


def test_views_have_their_own_storage_and_keep_the_arena_alive():
    a = torch.ops.llmcore.hugepage_arena(4096)
    v = torch.ops.llmcore.arena_view(a, 64, [3, 4], [4, 1], torch.float32)
    w = torch.ops.llmcore.arena_view(a, 64, [12], [1], torch.float32)
    assert v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() == a.data_ptr() + 64
    assert v.untyped_storage() is not w.untyped_storage()
    v.copy_(torch.arange(12.0).view(3, 4))
    assert torch.equal(w, torch.arange(12.0))  # the same bytes
    assert torch.equal(a[64:112].view(torch.float32), torch.arange(12.0))
    t = torch.ops.llmcore.arena_view(a, 256, [2, 3], [1, 2], torch.int16)  # any strides
    assert t.stride() == (1, 2)
    del a, w
    assert torch.equal(v.flatten(), torch.arange(12.0))  # still mapped: v holds the arena


def test_view_errors_name_the_argument():
    a = torch.ops.llmcore.hugepage_arena(1024)
    view = torch.ops.llmcore.arena_view
    with pytest.raises(ValueError, match="offset must be a non-negative multiple of float32"):
        view(a, 2, [4], [1], torch.float32)
    with pytest.raises(ValueError, match="offset must be"):
        view(a, -8, [4], [1], torch.float32)
    with pytest.raises(ValueError, match="past the arena's 1024"):
        view(a, 1000, [7], [1], torch.float32)
    with pytest.raises(ValueError, match="past the arena"):
        view(a, 0, [2, 200], [300, 1], torch.float32)
    with pytest.raises(ValueError, match="one entry per dimension"):
        view(a, 0, [2, 2], [1], torch.float32)
    with pytest.raises(ValueError, match=">= 0"):
        view(a, 0, [2], [-1], torch.float32)
    with pytest.raises(ValueError, match="arena must have dtype uint8"):
        view(a.view(torch.int8), 0, [2], [1], torch.float32)
    with pytest.raises(ValueError, match="1-D contiguous"):
        view(a.view(32, 32), 0, [2], [1], torch.float32)
    assert view(a, 1024, [0, 5], [5, 1], torch.float32).shape == (0, 5)  # empty: no bytes


# ---- packing --------------------------------------------------------------------------------
def test_pack_keeps_objects_values_strides_and_aliasing():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 7, generator=g))
    part = torch.arange(10.0)[2:8]                      # a view with a storage offset
    base = torch.randn(4, 4, generator=g)
    alias = base.t()                                    # another object, the same storage
    odd = torch.randint(-100, 100, (3, 5), dtype=torch.int8, generator=g)[:, 1:4]
    half = torch.randn(9, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        inf = torch.randn(6, generator=g)
    empty = torch.empty(0, 3)
    meta = torch.empty(4, device="meta")
    ts = [w, part, base, alias, odd, half, inf, empty, meta]
    before = [(id(t), t.detach().clone(), t.stride(), t.dtype, t.shape) for t in ts]
    n = memory.pack_tensors(ts)
    assert n == memory._region(35 * 4) + memory._region(6 * 4) + memory._region(16 * 4) \
        + memory._region((2 * 5 + 3) * 1) + memory._region(18) + memory._region(24)
    for t, (i, vals, stride, dtype, shape) in zip(ts, before, strict=True):
        assert id(t) == i and t.dtype == dtype and t.shape == shape
        if t.device.type == "cpu":
            assert t.stride() == stride and torch.equal(t, vals)
    assert isinstance(w, torch.nn.Parameter) and w.requires_grad and not w.is_inference()
    assert inf.is_inference()
    assert meta.is_meta and empty.numel() == 0
    base.add_(1)  # still one set of bytes for the two objects
    assert torch.equal(alias, base.t())
    (w * 3).sum().backward()
    assert torch.equal(w.grad, torch.full((5, 7), 3.0))
    if memory.hugepages_enabled():
        assert _advised([w, part, base, odd, half, inf])


def test_views_of_one_storage_stay_one_storage_across_repacks():
    whole = torch.arange(40.0)
    part = whole[6:30:3]  # an offset and a stride into the same storage
    other = torch.arange(5, dtype=torch.int16)
    for _ in range(2):  # packing again keeps them together
        memory.pack_tensors([whole, part, other])
        assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        assert other.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
        assert part.storage_offset() == 6 and part.stride() == (3,)
    whole[9] = -1.0
    assert part[1] == -1.0 and torch.equal(whole[:5], torch.arange(5.0))
    assert torch.equal(other, torch.arange(5, dtype=torch.int16))


def test_pack_under_inference_mode_keeps_normal_tensors_normal():
    w = torch.nn.Parameter(torch.randn(3))
    with torch.inference_mode():
        memory.pack_tensors([w])
    assert not w.is_inference()
    (w * 2).sum().backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_pack_nothing_packable_returns_zero():
    assert memory.pack_tensors([]) == 0
    assert memory.pack_tensors([torch.empty(0), torch.empty(3, device="meta")]) == 0


def test_wants_hugepages_and_the_environment_switch(monkeypatch):
    with pytest.raises(ValueError, match="hugepages must be True, False or 'auto'"):
        memory.wants_hugepages("yes", "cpu")
    assert not memory.wants_hugepages(False, "cpu")
    assert not memory.wants_hugepages(True, "meta")
    assert memory.wants_hugepages(True, "cpu", 1)
    assert memory.wants_hugepages("auto", "cpu", HUGE - 1) is False
    assert memory.wants_hugepages("auto", "cpu", HUGE) == memory.hugepages_enabled()
    monkeypatch.setenv("LLMCORE_HUGEPAGES", "0")
    assert not memory.hugepages_enabled()
    assert not memory.wants_hugepages("auto", "cpu", 1 << 30)
    assert memory.wants_hugepages(True, "cpu")  # an explicit True still packs


# ---- models and caches ----------------------------------------------------------------------
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 127, 40]])


def _model(tie=False):
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_name("tiny", tie_embeddings=tie))


def _all_tensors(m):
    return [t for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize("tie", [False, True])
def test_packed_model_computes_the_same_and_saves_exactly(tmp_path, tie):
    plain = _model(tie).quantize("mxint8", hugepages=False)
    packed = _model(tie).quantize("mxint8", hugepages=True)
    assert _advised(_all_tensors(packed)) == memory.hugepages_enabled()
    assert packed.head_tied() == tie
    with torch.inference_mode():
        assert torch.equal(plain(IDS), packed(IDS))
        cp, cq = plain.new_cache(1, 32, hugepages=False), packed.new_cache(1, 32, hugepages=True)
        assert _advised([cq.k_values, cq.v_values]) == memory.hugepages_enabled()
        packed(IDS, cache=cq, prefill=True)
        plain(IDS, cache=cp, prefill=True)
        tok = IDS[:, -1]
        assert torch.equal(plain.decode_greedy(tok, cp, 6), packed.decode_greedy(tok, cq, 6))
    packed.save_pretrained(str(tmp_path / "m"))  # views of one arena: no shared storage
    again = Transformer.from_pretrained(str(tmp_path / "m"), hugepages=True)
    sd, sd2 = plain.state_dict(), again.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.inference_mode():
        assert torch.equal(again(IDS), plain(IDS))
    dup = copy.deepcopy(packed)  # copies leave the arena
    with torch.inference_mode():
        assert torch.equal(dup(IDS), plain(IDS))


def test_repacking_moves_everything_to_a_new_arena():
    m = _model().quantize("mxint4", hugepages=True)
    first = {t.data_ptr() for t in _all_tensors(m)}
    ref = [t.clone() for t in _all_tensors(m)]
    n = m.pack_hugepages()
    assert n > 0 and not first & {t.data_ptr() for t in _all_tensors(m)}
    assert all(torch.equal(a, b) for a, b in zip(_all_tensors(m), ref, strict=True))


def test_auto_leaves_small_models_and_caches_alone(monkeypatch):
    m = _model()  # ~0.2 MB of fp32: below one huge page
    assert memory.packed_bytes(memory.module_tensors(m)) < HUGE
    m.quantize("mxint8")  # hugepages="auto"
    assert not _advised(_all_tensors(m))
    assert not _advised([m.new_cache(1, 16).k_values])
    monkeypatch.setattr(memory, "hugepages_enabled", lambda: True)
    big = m.new_cache(8, 1024)  # 4 MB of keys and values: "auto" puts them in an arena
    assert big.k_values.data_ptr() % HUGE == 0 and not big.k_values.any()
    assert big.v_values.data_ptr() == big.k_values.data_ptr() + big.k_values.nbytes
    with pytest.raises(ValueError, match="hugepages must be"):
        m.new_cache(1, 16, hugepages="sometimes")
    with pytest.raises(ValueError, match="hugepages must be"):
        m.quantize("mxint8", hugepages=1)
    with pytest.raises(ValueError, match="hugepages must be"):  # before reading anything
        Transformer.from_pretrained("/no/such/checkpoint", hugepages="x")


@linux_thp
def test_mxint8_cache_in_hugepages_decodes_the_same():
    m = _model().quantize("mxint8", hugepages=False)
    with torch.inference_mode():
        outs = []
        for hp in (False, True):
            c = m.new_cache(2, 64, storage="mxint8", hugepages=hp)
            assert _advised([c.k_values, c.k_exponents, c.v_exponents]) == hp
            ids = IDS.repeat(2, 1)
            m(ids, cache=c, prefill=True)
            outs.append(m.decode_greedy(ids[:, -1], c, 5))
        assert torch.equal(outs[0], outs[1])


def test_quantized_copy_packs_its_own_tensors_only():
    m = _model()
    emb = m.embed_tokens.weight
    where = emb.data_ptr()
    q = m.quantized("mxint8", hugepages=True)
    assert q.embed_tokens.weight is emb and emb.data_ptr() == where  # shared, not moved
    own = [t for t in _all_tensors(q) if t is not emb and t is not m.inv_freq]
    assert own and _advised(own) == memory.hugepages_enabled()
    assert not _advised([emb])
    with torch.inference_mode():
        assert torch.equal(q(IDS), m.quantized("mxint8", hugepages=False)(IDS))
    with pytest.raises(ValueError, match="hugepages must be"):
        m.quantized("mxint8", hugepages="no")


def test_info_says_whether_models_get_2mb_pages(capsys, monkeypatch):
    from llmcore import cli

    assert cli.main(["info"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("2 MB pages")]
    assert line and line[0].split(": ", 1)[1].startswith(
        "yes" if memory.hugepages_enabled() else "no")
    monkeypatch.setenv("LLMCORE_HUGEPAGES", "0")
    assert cli.main(["info"]) == 0
    assert "2 MB pages for CPU models and caches: no (LLMCORE_HUGEPAGES=0)" in \
        capsys.readouterr().out
