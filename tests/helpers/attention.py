"""Helpers of the fused attention tests (tests/test_attention_*.py): inputs, the float64
reference and PyTorch at the inputs' precision, the 2x accuracy check, varlen tables.

Tolerance (docs/testing.md; as flash-attention's tests/test_flash_attn.py with
attention_ref): the max error of llmcore against the float64 reference must be at most
twice the max error of the same computation done by PyTorch in the inputs' dtype
(``reference.attention_fwd(..., upcast=False)``), plus a small floor (1e-5 for float32,
two ulps at magnitude 1 for the half types). Outputs that are exactly determined (fully
masked rows: out 0, lse -inf, zero grads) are checked exactly, over many runs on CUDA where
a query block has no key tile (:func:`assert_zero_every_run`).
"""

from __future__ import annotations

import torch

from helpers import UNIT_ROUNDOFF, check_2x, floor_2x, randn
from llmcore import ops
from llmcore import reference as ref
from llmcore.ops import capabilities

OPS = ("attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd")
# head_dims that take the kernel (CPU takes any; these are the ones the main cases rotate
# through), and the sweep over every head_dim the device's kernels take.
HEAD_DIMS = {"cpu": (16, 80, 128), "cuda": (64, 128)}
SWEEP_HEAD_DIMS = {"cpu": (1, 7, 32, 64, 96, 256),
                   "cuda": capabilities.ATTENTION_CUDA_FWD_HEAD_DIMS}

# (batch, seq_q, seq_k, heads, kv_heads, causal, softmax_scale)
FWD_CASES = [
    (1, 1, 1, 1, 1, False, None),
    (3, 7, 7, 4, 1, True, None),
    (1, 97, 97, 8, 1, True, 0.3),
    (3, 128, 128, 4, 4, False, None),
    (1, 1025, 1025, 2, 2, True, None),
    (3, 7, 97, 8, 1, True, None),      # seq_q < seq_k, causal
    (1, 97, 7, 4, 1, True, None),      # seq_q > seq_k, causal: rows 0..89 see no key
    (3, 128, 7, 2, 2, False, 1.7),     # seq_q > seq_k
    (1, 1, 1025, 8, 1, True, None),    # one query against a long cache
    (1, 1025, 97, 4, 4, False, None),
]


GRAD_CASES = [
    (1, 1, 1, 1, 1, False, None),
    (3, 7, 7, 4, 1, True, None),
    (1, 97, 97, 8, 1, True, None),
    (3, 128, 128, 2, 2, False, 0.3),
    (1, 7, 97, 4, 1, True, None),
    (1, 1025, 1025, 2, 1, True, None),
    (1, 97, 7, 4, 1, True, None),
    (3, 128, 97, 8, 8, False, None),
]


def case_id(c):
    b, sq, sk, h, hkv, causal, scale = c
    return f"b{b}-q{sq}-k{sk}-h{h}x{hkv}" + ("-causal" if causal else "") + (
        f"-s{scale}" if scale is not None else "")


def head_dim_for(device, i: int) -> int:
    dims = HEAD_DIMS[device.type]
    return dims[i % len(dims)]


def make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=False):
    q = randn((b, sq, h, d), dtype, device)
    k = randn((b, sk, hkv, d), dtype, device)
    v = randn((b, sk, hkv, d), dtype, device)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def reference_dense(q, k, v, causal, scale, grad_out=None):
    """(out, lse, grads) of the float64 reference and of PyTorch at q's dtype."""
    res = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
        if upcast:
            leaves = [t.detach().double().requires_grad_(grad_out is not None) for t in leaves]
        out, lse = ref.attention_fwd(*leaves, causal, scale, upcast=upcast)
        grads = None
        if grad_out is not None:
            (out * grad_out.to(out.dtype)).sum().backward()
            grads = [t.grad for t in leaves]
        res.append((out.detach(), lse, grads))
    return res


def run_dense(q, k, v, causal, scale, grad_out=None):
    out, lse = ops.attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    grads = None
    if grad_out is not None:
        (out * grad_out).sum().backward()
        grads = [q.grad, k.grad, v.grad]
    return out, lse, grads


def check_dense(q, k, v, causal, scale, with_grad: bool, what: str):
    dtype = q.dtype
    g = randn(q.shape, dtype, q.device) if with_grad else None
    out, lse, grads = run_dense(q, k, v, causal, scale, g)
    assert out.dtype == dtype and out.device == q.device and out.shape == q.shape
    b, sq, h, _ = q.shape
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq), (lse.dtype, lse.shape)
    assert not lse.requires_grad, "lse must be non-differentiable"
    (o64, l64, g64), (opt, lpt, gpt) = reference_dense(q, k, v, causal, scale, g)
    check_2x(out, o64, opt, dtype, f"{what} out")
    check_2x(lse, l64, lpt, torch.float32, f"{what} lse")
    if with_grad:
        for n, a, e, p in zip("qkv", grads, g64, gpt, strict=True):
            assert a is not None and a.dtype == dtype and a.shape == e.shape, f"{what} d{n}"
            check_2x(a, e, p, dtype, f"{what} d{n}")
    return out, lse, grads


class Deterministic:
    """torch.use_deterministic_algorithms(True) for a block, restoring the previous mode."""

    def __enter__(self):
        self.prev = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev[0], warn_only=self.prev[1])
        return False


def grads_of(fn, leaves, g):
    out = fn(*leaves)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def assert_same(a, b, what):
    assert torch.equal(a, b), f"{what}: differs from the contiguous inputs' result " \
        f"(max |diff| {(a.double() - b.double()).abs().max().item():.3e})"


LENS_Q = [5, 0, 97, 1, 33, 7, 0]
LENS_K = [5, 3, 97, 0, 40, 1, 0]


def cu_of(lens, device):
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def varlen_close(actual, expected, dtype, what):
    """Varlen against per-sequence dense calls of the same kernels: equal up to a rounding
    of the output dtype (the sums may be ordered differently)."""
    u = 1e-6 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype]
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: {list(a.shape)} != {list(e.shape)}"
    fin = torch.isfinite(e)
    assert torch.equal(a[~fin], e[~fin]) and torch.isfinite(a[fin]).all(), f"{what}: inf/nan"
    atol = floor_2x(dtype, e)
    bad = (a - e).abs()[fin] > 2 * u * e.abs()[fin] + atol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ; max |diff| " \
        f"{(a - e)[fin].abs().max().item():.3e}"



# ---------------------------------------------------------------------------------------
# query blocks with no key tile (a race of the CUDA kernels' output staging, shown on some
# runs only): repeat the call, count the wrong elements on the device
# ---------------------------------------------------------------------------------------
NO_KEY_REPS = {"cuda": 1000, "cpu": 2}  # the CPU kernels have no such race: a smoke run


def assert_zero_every_run(run, reps: int, what: str) -> None:
    """Call ``run()`` ``reps`` times; every tensor it returns must be all zero (False for a
    bool tensor) on every run, NaN counting as non-zero. The count stays on the device and
    is read every 100 runs (one sync each), so a failure stops early."""
    bad = 0
    for i in range(reps):
        bad = bad + sum(torch.count_nonzero(t) for t in run())
        if i % 100 == 99 or i == reps - 1:
            total = int(bad)
            assert total == 0, f"{what}: {total} elements that must be exactly 0 were not, " \
                f"within the first {i + 1} of {reps} runs"
