"""llmcore.ops.profile: the per-part wall time of the CPU decode ops (decoder_layers,
greedy_decode), collected only while switched on."""

from __future__ import annotations

import time

import pytest
import torch

from llmcore import _ext
from llmcore.models import Transformer, TransformerConfig
from llmcore.ops import profile
from llmcore.ops.profile import PARTS, decode_profile, read_decode_profile, set_decode_profile

pytestmark = pytest.mark.skipif(not _ext.has_op("decode_profile"),
                                reason="extension without decode_profile")

LAYER_PARTS = ("norms", "qkv", "rope", "kv_append", "attention", "o_proj", "gate_up",
               "silu_mul", "down")


def _model(quant="mxint8") -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
                                          ffn_dim=200, vocab_size=211, max_seq_len=128)).eval()
    if quant:
        model.quantize(quant)
    return model


def _filled(model):
    cache = model.new_cache(1, 96)
    with torch.inference_mode():
        model(torch.randint(0, 211, (1, 20)), cache=cache, prefill=True)
    return cache


@pytest.fixture(autouse=True)
def _off():
    set_decode_profile(False)
    read_decode_profile(reset=True)
    yield
    set_decode_profile(False)
    read_decode_profile(reset=True)


def test_parts_match_the_op():
    assert PARTS == ("embed", "norms", "qkv", "rope", "kv_append", "attention", "o_proj",
                     "gate_up", "silu_mul", "down", "head", "argmax")
    raw = torch.ops.llmcore.decode_profile(None, False)
    assert len(raw) == len(PARTS) + 3  # seconds per part, layer calls, steps, enabled


@pytest.mark.parametrize("quant", ["mxint8", None])
def test_greedy_steps_are_split_into_parts(quant):
    model = _model(quant)
    cache = _filled(model)
    t0 = time.perf_counter()
    with decode_profile() as prof:
        out = model.decode_greedy(torch.tensor([3]), cache, 7)
    wall = time.perf_counter() - t0
    assert out.shape == (1, 7)
    assert prof.steps == 7 and prof.layer_calls == 7  # one decoder_layers call per step
    for k in PARTS:
        assert prof.seconds[k] > 0, k
    assert 0 < prof.total <= wall
    per = prof.per_call()
    assert per["qkv"] == pytest.approx(prof.seconds["qkv"] / 7)
    table = prof.table()
    assert "attention" in table and "greedy step" in table and "7 greedy steps" in table


def test_a_forward_counts_its_layers_not_its_head():
    model = _model()
    cache = _filled(model)
    with decode_profile() as prof, torch.inference_mode():
        model(torch.tensor([[4, 5, 6]]), cache=cache)  # a verification-sized call
    assert prof.layer_calls == 1 and prof.steps == 0
    for k in LAYER_PARTS:
        assert prof.seconds[k] > 0, k
    for k in ("embed", "head", "argmax"):  # Python's, outside the ops
        assert prof.seconds[k] == 0, k
    assert "decoder_layers call" in prof.table()


def test_off_by_default_and_after_the_block():
    model = _model()
    cache = _filled(model)
    model.decode_greedy(torch.tensor([3]), cache, 3)
    got = read_decode_profile()
    assert got.layer_calls == 0 and got.steps == 0 and got.total == 0
    with decode_profile():
        pass
    assert set_decode_profile(False) is False  # the block switched it back off
    model.decode_greedy(torch.tensor([3]), cache, 2)
    assert read_decode_profile().steps == 0


def test_switch_read_and_reset():
    model = _model()
    cache = _filled(model)
    assert set_decode_profile(True) is False
    model.decode_greedy(torch.tensor([3]), cache, 2)
    got = read_decode_profile()
    assert got.steps == 2 and got.seconds["qkv"] > 0
    assert read_decode_profile(reset=True).steps == 2  # read, then zeroed
    assert read_decode_profile().steps == 0
    assert set_decode_profile(False) is True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_decode_profile(1)


def test_block_keeps_what_ran_when_it_raises_and_restores_the_state():
    model = _model()
    cache = _filled(model)
    set_decode_profile(True)  # on before: stays on after
    with pytest.raises(RuntimeError, match="boom"):
        with decode_profile() as prof:
            model.decode_greedy(torch.tensor([3]), cache, 2)
            raise RuntimeError("boom")
    assert prof.steps == 2
    assert set_decode_profile(False) is True


def test_empty_profile():
    p = profile.StepProfile()
    assert p.total == 0 and p.per_call()["qkv"] == 0
    assert "total" in p.table()
