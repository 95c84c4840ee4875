"""BFPTensor save/load through safetensors (exact, atomic) and the BFPTensor API."""

import os

import pytest
import safetensors.torch
import torch
from helpers import HAS_CUDA, PRESET_NAMES, assert_equal_nan, randn, randn_blocks
from safetensors import safe_open

from llmcore import ops
from llmcore import reference as ref
from llmcore.formats import BFPFormat, get_format
from llmcore.ops import BFPTensor, load_bfp, save_bfp

FORMATS = [get_format(n) for n in PRESET_NAMES] + [BFPFormat("c3b3", 3, 3),
                                                    BFPFormat("c5b48", 5, 48)]


def _bfp(shape, fmt, dtype=torch.float32, device="cpu") -> BFPTensor:
    fmt = get_format(fmt)
    x = randn_blocks(shape, fmt.block_size, torch.float32, "cpu", (-30, 30))
    m, e = ref.bfp_quantize(x, fmt.mantissa_bits, fmt.block_size)
    return BFPTensor(m, e, fmt, shape, dtype).to(device)


def assert_same_bfp(a: BFPTensor, b: BFPTensor):
    assert isinstance(b, BFPTensor)
    assert a.format == b.format and a.format.name == b.format.name
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.mantissa.dtype == b.mantissa.dtype and a.exponent.dtype == b.exponent.dtype
    assert torch.equal(a.mantissa.cpu(), b.mantissa.cpu())
    assert torch.equal(a.exponent.cpu(), b.exponent.cpu())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_roundtrip_exact(fmt, tmp_path):
    tensors = {
        "layers.0.weight": _bfp((5, 97), fmt),
        "layers.1.weight": _bfp((2, 3, 33), fmt, torch.bfloat16),
        "odd": _bfp((1,), fmt, torch.float16),
        "norm.weight": randn((97,)),
        "ids": torch.randint(-5, 5, (4, 3)),
        "half": randn((3, 7), torch.bfloat16),
    }
    tensors["nan"] = _bfp((2, 40), fmt)
    tensors["nan"].exponent[0, 0] = 255
    path = tmp_path / "model.safetensors"
    save_bfp(tensors, path, metadata={"note": "hello"})
    loaded = load_bfp(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        if isinstance(t, BFPTensor):
            assert_same_bfp(t, loaded[name])
            assert_equal_nan(loaded[name].dequantize(), t.dequantize(), name)
        else:
            assert type(loaded[name]) is torch.Tensor
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["note"] == "hello"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_roundtrip_from_op_and_noncontiguous(tmp_path, device):
    x = randn((4, 3, 65), device=device).transpose(0, 1)
    q = ops.bfp_quantize(x, "mxint4")
    qs = BFPTensor(q.mantissa.transpose(0, 1).contiguous().transpose(0, 1),
                   q.exponent.transpose(0, 1).contiguous().transpose(0, 1), q.format, q.shape)
    assert not qs.mantissa.is_contiguous()
    save_bfp({"q": q, "qs": qs}, tmp_path / "a.safetensors")
    out = load_bfp(tmp_path / "a.safetensors", device=device)
    assert out["q"].device.type == device.type
    assert_same_bfp(q, out["q"])
    assert_same_bfp(q, out["qs"])


def test_overwrite_and_plain_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_bfp({"a": _bfp((3, 32), "mxint8")}, path)
    new = _bfp((2, 16), "msfp12")
    save_bfp({"b": new}, str(path))  # str path, overwrites
    out = load_bfp(str(path))
    assert list(out) == ["b"]
    assert_same_bfp(new, out["b"])
    # any safetensors file loads (plain tensors only)
    plain = {"x": randn((3, 4)), "y": torch.arange(5)}
    safetensors.torch.save_file(plain, str(tmp_path / "plain.safetensors"))
    out = load_bfp(tmp_path / "plain.safetensors")
    assert set(out) == {"x", "y"} and all(torch.equal(out[k], plain[k]) for k in plain)


def _failing_save(exc):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the failure
            f.write(b"\x00" * 100)
        raise exc
    return save_file


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_atomic_write(exc, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = {"w": _bfp((4, 64), "mxint8"), "b": randn((4,))}
    save_bfp(old, path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save(exc))
    with pytest.raises(type(exc)):
        save_bfp({"w": _bfp((4, 64), "mxint4")}, path)
    assert path.read_bytes() == before, "the old file was modified by a failed save"
    assert os.listdir(tmp_path) == ["model.safetensors"], "a temporary file was left behind"
    monkeypatch.undo()
    out = load_bfp(path)
    assert_same_bfp(old["w"], out["w"])
    # no previous file: a failed save leaves nothing
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save(exc))
    with pytest.raises(type(exc)):
        save_bfp({"w": old["w"]}, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_file_permissions_follow_umask(tmp_path):
    # the atomic write must not leave the file with the temp file's private mode (0600):
    # a checkpoint gets the permissions a plain write would give it
    old = os.umask(0o022)
    try:
        save_bfp({"w": _bfp((2, 32), "mxint8")}, tmp_path / "a.safetensors")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "a.safetensors").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o644, oct(mode)


def test_name_collision_is_not_silent(tmp_path):
    # a plain tensor named like a BFP tensor's part must not silently replace it
    q = _bfp((2, 32), "mxint8")
    plain = torch.zeros(2, 32, dtype=torch.int8)
    path = tmp_path / "c.safetensors"
    for tensors in ({"w": q, "w.mantissa": plain}, {"w.mantissa": plain, "w": q}):
        try:
            save_bfp(tensors, path)
        except ValueError as e:  # rejecting the clash is fine ...
            assert "w.mantissa" in str(e)
            continue
        out = load_bfp(path)  # ... otherwise both must come back exactly
        assert set(out) == {"w", "w.mantissa"}
        assert_same_bfp(q, out["w"])
        assert torch.equal(out["w.mantissa"], plain)


def test_save_rejects_other_values(tmp_path):
    with pytest.raises(TypeError, match="tensors\\['w'\\]"):
        save_bfp({"w": [1, 2, 3]}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# BFPTensor API
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_bfptensor_attributes(fmt):
    q = _bfp((3, 5, 97), fmt, torch.bfloat16)
    assert q.shape == torch.Size((3, 5, 97)) and q.dim() == 3 and q.size(-1) == 97
    assert q.size() == q.shape and q.device == torch.device("cpu")
    assert q.mantissa.shape == (3, 5, fmt.mantissa_cols(97))
    assert q.exponent.shape == (3, 5, fmt.exponent_cols(97))
    assert q.nbytes() == 15 * fmt.mantissa_cols(97) + 15 * fmt.exponent_cols(97)
    assert fmt.name in repr(q) and "[3, 5, 97]" in repr(q)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_bfptensor_dequantize(fmt, device):
    q = _bfp((4, 97), fmt, torch.float16, device)
    f = q.format
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        y = q.dequantize(dtype)
        want = dtype or torch.float16
        assert y.dtype == want and y.device == q.device
        expected = ref.bfp_dequantize(q.mantissa.cpu(), q.exponent.cpu(), f.mantissa_bits,
                                      f.block_size, 97, want)
        assert_equal_nan(y, expected, f"{f.name} dequantize({dtype})")


def test_bfptensor_to_and_contiguous(device):
    q = _bfp((6, 50), "mxint4", torch.bfloat16)
    q2 = q.to(device)
    assert q2.device.type == device.type
    assert_same_bfp(q, q2)
    back = q2.to("cpu")
    assert_same_bfp(q, back)
    meta = q.to("meta")
    assert meta.mantissa.is_meta and meta.exponent.is_meta and meta.shape == q.shape
    c = BFPTensor(q.mantissa.T.contiguous().T, q.exponent, q.format, q.shape, q.dtype)
    cc = c.contiguous()
    assert cc.mantissa.is_contiguous()
    assert_same_bfp(q, cc)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_save_from_cuda(tmp_path):
    q = _bfp((5, 64), "mxint8", device="cuda")
    save_bfp({"q": q}, tmp_path / "g.safetensors")
    out = load_bfp(tmp_path / "g.safetensors")
    assert out["q"].device.type == "cpu"
    assert_same_bfp(q, out["q"])
