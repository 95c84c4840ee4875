"""The capability table (llmcore/ops/capabilities.py) is the one list of what the kernels
take: the generated CUDA sources follow it, the hand-written CUDA lists agree with it, and
the dispatch helper reads it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import torch

from llmcore import _ext
from llmcore.ops import _dispatch, capabilities

ROOT = Path(__file__).resolve().parents[1]


def test_table_is_plain_data():
    """No imports (generate_kernels.py loads it by path, without torch)."""
    tree = ast.parse((ROOT / "llmcore" / "ops" / "capabilities.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports, f"capabilities.py imports {[ast.unparse(n) for n in imports]}"


def test_table_covers_every_op():
    assert set(capabilities.KERNELS) == set(_ext.OPS)
    for op, per_device in capabilities.KERNELS.items():
        for dev, entry in per_device.items():
            assert set(entry["dtypes"]) <= set(capabilities.FLOAT_DTYPES), (op, dev)


def test_generated_sources_match_the_table():
    """csrc/attention/generated/ is what generate_kernels.py writes (as CI checks)."""
    p = subprocess.run([sys.executable, str(ROOT / "csrc" / "attention" / "generate_kernels.py"),
                        "--check"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    header = (ROOT / "csrc" / "attention" / "generated" / "head_dims.h").read_text()
    fwd = ", ".join(map(str, capabilities.ATTENTION_CUDA_FWD_HEAD_DIMS))
    assert f'LLMCORE_ATTENTION_FWD_HEAD_DIMS_STR "{fwd}"' in header


def test_decode_cuda_head_dims_agree():
    """decode_cuda.cuh's decode_attention_supported lists the table's head dims."""
    text = (ROOT / "csrc" / "decode" / "decode_cuda.cuh").read_text()
    body = text[text.index("decode_attention_supported"):]
    body = body[:body.index("}")]
    dims = tuple(int(d) for d in re.findall(r"head_dim == (\d+)", body))
    assert dims == capabilities.DECODE_CUDA_HEAD_DIMS


def test_dispatch_follows_the_table():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert capabilities.supports("attention_fwd", "cuda", "float16", 128)
    assert not capabilities.supports("attention_fwd", "cuda", "float32", 128)
    assert not capabilities.supports("attention_bwd", "cuda", "bfloat16", 256)
    assert not capabilities.supports("decode_attention", "cuda", "float16", 96)
    assert capabilities.supports("attention_fwd", "cpu", "float16", 7)
    assert not capabilities.supports("attention_fwd", "mps", "float16", 64)
    assert not _dispatch.kernel_supported("attention_fwd", cpu, torch.float64, 64)
    assert _dispatch.kernel_supported("attention_fwd", cpu, torch.float32, 7) == \
        _ext.has_kernel("attention_fwd", cpu)
    assert not _dispatch.kernel_supported("attention_fwd", cuda, torch.float32, 64)
