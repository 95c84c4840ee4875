"""BFP format definitions (docs/formats.md): presets, validation, storage arithmetic."""

import dataclasses

import pytest

import llmcore
from llmcore.formats import PRESETS, BFPFormat, check_rounding, get_format

# The preset table of docs/formats.md: name -> (mantissa_bits, block_size)
TABLE = {
    "mxint8": (8, 32),
    "mxint4": (4, 32),
    "msfp16": (8, 16),
    "msfp12": (4, 16),
    "bfp16": (8, 8),
}


def test_presets_match_design_table():
    assert set(PRESETS) == set(TABLE)
    for name, (bits, block) in TABLE.items():
        f = PRESETS[name]
        assert (f.name, f.mantissa_bits, f.block_size) == (name, bits, block)
    assert llmcore.PRESETS is PRESETS


@pytest.mark.parametrize("name", list(TABLE))
def test_get_format_case_insensitive(name):
    for spelling in (name, name.upper(), name.capitalize(), name[:2].upper() + name[2:]):
        f = get_format(spelling)
        assert f is PRESETS[name]
        assert (f.mantissa_bits, f.block_size) == TABLE[name]


def test_get_format_passes_formats_through():
    f = BFPFormat("custom", 5, 48)
    assert get_format(f) is f
    assert llmcore.get_format is get_format


@pytest.mark.parametrize("bad", ["mxint16", "", "mx int8", "fp8", "mxint8 "])
def test_unknown_format_name(bad):
    with pytest.raises(ValueError, match="unknown BFP format"):
        get_format(bad)


@pytest.mark.parametrize("bad", [8, None, 3.5, ("mxint8",)])
def test_format_wrong_type(bad):
    with pytest.raises(TypeError, match="format"):
        get_format(bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("block", [1, 3, 32, 48, 1024])
def test_valid_custom_formats(bits, block):
    f = BFPFormat("c", bits, block)
    assert f.packed == (bits <= 4)
    assert f.max_mantissa == 2 ** (bits - 1) - 1
    assert f.bits_per_element == pytest.approx((4 if bits <= 4 else 8) + 8 / block)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -8, 4.0, "8", None])
def test_bad_mantissa_bits(bits):
    with pytest.raises(ValueError, match="mantissa_bits"):
        BFPFormat("bad", bits, 32)


@pytest.mark.parametrize("block", [0, -1, 1025, 4096, 32.0, "32", None])
def test_bad_block_size(block):
    with pytest.raises(ValueError, match="block_size"):
        BFPFormat("bad", 8, block)


@pytest.mark.parametrize("name,bpe", [
    ("mxint8", 8.25), ("mxint4", 4.25), ("msfp16", 8.5), ("msfp12", 4.5), ("bfp16", 9.0)])
def test_bits_per_element(name, bpe):
    assert get_format(name).bits_per_element == bpe


@pytest.mark.parametrize("name", list(TABLE))
@pytest.mark.parametrize("k", [1, 2, 7, 16, 17, 32, 33, 97, 1025])
def test_storage_columns(name, k):
    f = get_format(name)
    bits, block = TABLE[name]
    assert f.mantissa_cols(k) == ((k + 1) // 2 if bits <= 4 else k)
    assert f.exponent_cols(k) == (k + block - 1) // block
    assert f.max_mantissa == {8: 127, 4: 7}[bits]


def test_format_is_frozen_and_hashable():
    f = get_format("mxint8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.block_size = 16
    assert {f: 1}[BFPFormat("mxint8", 8, 32)] == 1
    assert str(f) == "mxint8"


def test_check_rounding():
    assert check_rounding("even") is True
    assert check_rounding("nearest") is False
    for bad in ("Nearest", "up", "", "stochastic"):
        with pytest.raises(ValueError, match="rounding"):
            check_rounding(bad)
