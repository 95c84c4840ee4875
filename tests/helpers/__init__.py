"""Helpers shared by the tests: inputs, tolerance checks, kernel availability, child
programs. Imported as ``helpers`` (pytest puts tests/ on sys.path); conftest.py holds only
fixtures.

- tolerance helpers: a GEMM result is compared with the float64 product with a bound tied
  to fp32 accumulation, ``8 * K * 2^-24 * (|a| @ |b|^T)``, plus one rounding of the output
  dtype; attention results with the 2x rule of :func:`check_2x`.
- :func:`need_kernel_dtype`: skip a test whose dtype takes the reference path on the device
  (per :mod:`llmcore.ops.capabilities`).
- :func:`run_program`: run one of tests/programs/*.py in a child process (a crash there is
  a test failure, not the end of the session).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmcore
from llmcore.ops import capabilities

HAS_CUDA = torch.cuda.is_available()

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRESET_NAMES = ["mxint8", "mxint4", "msfp16", "msfp12", "bfp16"]

# Unit roundoff (half an ulp, relative) of each output dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Smallest subnormal: the absolute rounding floor of each output dtype.
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
FP32_EPS = 2.0**-24

# dtypes with attention / decode kernels per device type (the capability table's)
KERNEL_DTYPES = {dev: tuple(getattr(torch, n) for n in capabilities.kernel_dtypes(
    "attention_fwd", dev)) for dev in ("cpu", "cuda")}

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


def need_kernel_dtype(device, dtype, op: str = "attention_fwd") -> None:
    """Skip the test when ``dtype`` takes the reference path of ``op`` on ``device``."""
    if not capabilities.supports(op, device.type, str(dtype).removeprefix("torch.")):
        pytest.skip(f"{dtype} takes the reference path on {device.type}")


def run_program(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run tests/programs/<name>.py with ``args`` in a child process that imports the same
    llmcore as the tests; returns the completed process (text output captured)."""
    root = str(Path(llmcore.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(PROGRAMS / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
def randn_blocks(shape, block_size: int, dtype=torch.float32, device="cpu",
                 log2_range: tuple[float, float] = (-100.0, 100.0)) -> torch.Tensor:
    """Normal values with a log-uniform scale per block of ``block_size`` along the last
    axis, so every block has its own shared exponent. Never zeros. Built on the CPU from
    the test's seed, then moved, so every device sees the same numbers."""
    shape = tuple(shape)
    k = shape[-1]
    nb = -(-k // block_size)
    lo, hi = log2_range
    if dtype == torch.float16:  # stay inside fp16's range (no accidental Inf blocks)
        lo = min(max(lo, -20.0), 11.0)
        hi = max(min(hi, 12.0), lo + 1.0)
    s = torch.empty(*shape[:-1], nb).uniform_(lo, hi)
    s = s.repeat_interleave(block_size, dim=-1)[..., :k]
    x = torch.randn(shape, dtype=torch.float64) * torch.exp2(s.double())
    x = torch.where(x == 0, 1.0, x)
    return x.to(dtype).to(device)


def randn(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    x = torch.randn(tuple(shape), dtype=torch.float32)
    x = torch.where(x == 0, 1.0, x)
    return x.to(dtype).to(device)


# ---------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------
def gemm_tol(a64: torch.Tensor, b64: torch.Tensor, out_dtype: torch.dtype,
             bias64: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected, tolerance) for y = a @ b^T (+ bias) computed with fp32 accumulation and
    rounded to ``out_dtype``. a64 [M, K], b64 [N, K] float64 (already the exact operand
    values)."""
    y = a64 @ b64.T
    mag = a64.abs() @ b64.abs().T
    if bias64 is not None:
        y = y + bias64
        mag = mag + bias64.abs()
    k = a64.shape[-1]
    tol = 8 * (k + 1) * FP32_EPS * mag
    if out_dtype != torch.float32:
        tol = tol * (1 + 2 * UNIT_ROUNDOFF[out_dtype]) + UNIT_ROUNDOFF[out_dtype] * y.abs()
    tol = tol + TINY[out_dtype]
    return y, tol


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor,
                  what: str = "") -> None:
    """|actual - expected| <= tol elementwise; NaN exactly where expected is NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    t = tol.detach().to("cpu", torch.float64).expand_as(e)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: NaN pattern differs (first mismatches at {idx}; "
                             f"{int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} expected)")
    ok = ~nan_e
    err = torch.where(ok, (a - e).abs(), 0.0)
    bad = err > torch.where(ok, t, 0.0)
    if bad.any():
        flat = int(torch.argmax(torch.where(bad, err / t.clamp_min(1e-300), 0.0)))
        i = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), e.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst at {i}: "
            f"actual {a[i].item()!r}, expected {e[i].item()!r}, |err| {err[i].item():.3e} > "
            f"tol {t[i].item():.3e}")


def assert_equal_nan(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Exact equality (dtype, shape, values), NaN == NaN."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def floor_2x(dtype, expected: torch.Tensor) -> float:
    """Absolute floor of the 2x rule: 1e-5 (fp32) or four unit roundoffs (half types) at the
    scale of max(1, max|expected|)."""
    fin = expected[torch.isfinite(expected)]
    amax = fin.abs().max().item() if fin.numel() else 0.0
    per = 1e-5 if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype]
    return per * max(1.0, amax)


def check_2x(actual, expected64, pts, dtype, what: str) -> None:
    """The attention accuracy rule: max|actual - expected64| <= 2 * max|pt - expected64| +
    floor, for pt the same computation done by PyTorch at the low precision (one tensor or
    several, the worst counts); infinities exactly where expected64 has them; never NaN."""
    if isinstance(pts, torch.Tensor):
        pts = [pts]
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {list(a.shape)} != {list(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: {int(torch.isnan(a).sum())} NaN in the output"
    assert not torch.isnan(e).any(), f"{what}: NaN in the float64 reference (test bug)"
    inf_e = torch.isinf(e)
    if not torch.equal(torch.isinf(a), inf_e) or not torch.equal(a[inf_e], e[inf_e]):
        idx = (torch.isinf(a) != inf_e).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: infinities differ from the reference (first at {idx})")
    fin = ~inf_e
    if not fin.any():
        return
    err = (a - e)[fin].abs().max().item()
    err_pt = max((p.detach().to("cpu", torch.float64) - e)[fin].abs().nan_to_num(nan=0.0)
                 .max().item() for p in pts)
    fl = floor_2x(dtype, e)
    if not err <= 2 * err_pt + fl:
        diff = torch.where(fin, (a - e).abs(), 0.0)
        i = tuple(int(x) for x in torch.unravel_index(diff.argmax(), e.shape))
        raise AssertionError(
            f"{what}: max|err| {err:.3e} > 2 * {err_pt:.3e} (PyTorch in {dtype}) + floor "
            f"{fl:.3e}; worst at {i}: actual {a[i].item()!r}, expected {e[i].item()!r}")


def write_model_dir(path, seed: int = 0, **config) -> Path:
    """A local Hugging Face-style model directory for CLI tests: a tiny random Llama
    (``config`` overrides the ``tiny`` preset) saved by llmcore, and a word-level
    tokenizer.json with one word per token id ("<unk>", "<s>", "</s>", then "w3", "w4",
    ...) plus a chat template."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmcore.models import Transformer, TransformerConfig

    path = Path(path)
    torch.manual_seed(seed)
    cfg = TransformerConfig.from_name("tiny", **config)
    model = Transformer(cfg)
    model.save_pretrained(path)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, cfg.vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['content'] }} {{ eos_token }} {% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "bos_token": "<s>", "chat_template": template}))
    return path


def assert_close_nan(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """NaN exactly where ``expected`` has NaN, and within ``tol`` (absolute and relative)
    elsewhere (Inf must match exactly)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), (
        f"{what}: NaN at {a.isnan().nonzero().tolist()[:8]}, expected at "
        f"{e.isnan().nonzero().tolist()[:8]}")
    keep = ~e.isnan()
    torch.testing.assert_close(a[keep], e[keep], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
