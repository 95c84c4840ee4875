"""The op table: every schema in csrc/ops.cpp is known to llmcore._ext and has a CPU kernel."""

import os
import re

import torch

from llmcore import _ext

CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")
# csrc/ops.cpp holds every kernel op's schema but decoder_layers', defined with its class.
# (The two host-memory utilities hugepage_arena and arena_view, defined with their code
# in csrc/common/hugepages_binding.cpp, are no kernels: they are not in _ext.OPS and take
# no dispatch key; tests/test_memory.py covers them. Nor is decode_profile, the step
# profile's switch and totals in csrc/fused/step_profile_binding.cpp: tests/test_profile.py.)
SCHEMA_FILES = ("ops.cpp", os.path.join("fused", "decoder_layers_binding.cpp"))


def test_ops_list_matches_schema_table():
    names = []
    for name in SCHEMA_FILES:
        with open(os.path.join(CSRC, name)) as f:
            names += re.findall(r'm\.def\("(\w+)\(', f.read())
    assert tuple(names) == _ext.OPS


def test_every_op_has_a_cpu_kernel():
    missing = [op for op in _ext.OPS if not _ext.has_kernel(op, torch.device("cpu"))]
    assert not missing, f"no CPU kernel for {missing}"


def test_unknown_op_and_device():
    assert not _ext.has_op("no_such_op")
    assert not _ext.has_kernel("bfp_quantize", torch.device("mps"))  # no such backend here
    assert not _ext.has_kernel("no_such_op", torch.device("cpu"))
