"""Decoding ops, bad inputs: the Python faces and the bindings refuse them with a message
naming the argument; with validate=False out-of-range lengths, positions and pages never
make a kernel read or write outside the cache.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import KERNEL_DTYPES, assert_close_nan, randn, run_program
from helpers.decode import (
    as_bfp,
    bits,
    need_kernel,
)

from llmcore import ops
from llmcore import reference as ref
from llmcore.ops import BFPTensor

pytestmark = pytest.mark.filterwarnings("ignore:llmcore.*reference:RuntimeWarning")


def _bad_base(device, dtype=None):
    dtype = dtype or KERNEL_DTYPES[device.type][-1]
    b, hkv, g, d, cap = 2, 2, 4, 64, 20
    kc, vc = (randn((b, cap, hkv, d), dtype, device) for _ in range(2))
    q = randn((b, 1, hkv * g, d), dtype, device)
    seqlens = torch.tensor([3, 20], dtype=torch.int32, device=device)
    return q, kc, vc, seqlens


def test_decode_attention_bad_inputs(device):
    q, kc, vc, sl = _bad_base(device)
    i32 = dict(dtype=torch.int32, device=device)
    pk, pv = kc.reshape(8, 5, 2, 64), vc.reshape(8, 5, 2, 64)
    table = torch.arange(8, **i32).reshape(2, 4)
    bad = [
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([3, 21], **i32))),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([-1, 2], **i32))),
        ("cache_seqlens", dict(cache_seqlens=sl.long())),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([3], **i32))),
        ("cache_seqlens", dict(cache_seqlens=sl.reshape(2, 1))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=torch.tensor(
            [[0, 1, 2, 3], [4, 5, 6, 8]], **i32))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=torch.tensor(
            [[-1, 1, 2, 3], [4, 5, 6, 7]], **i32))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table.long())),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table[:1])),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table.reshape(8))),
        ("cache_seqlens", dict(k_cache=pk, v_cache=pv, block_table=table[:, :3])),  # cap 15
        ("head_dim", dict(k_cache=kc[..., :32].contiguous(), v_cache=vc[..., :32].contiguous())),
        ("dtype", dict(k_cache=kc.double(), v_cache=vc.double())),
        ("v_cache", dict(v_cache=vc[:, :10].contiguous())),
        ("kv_heads", dict(q=torch.cat([q, q[:, :, :1]], 2))),
        (r"\bq\b", dict(q=q.double(), k_cache=kc.double(), v_cache=vc.double())),
        (r"\bq\b", dict(q=q[0])),
        ("k_cache", dict(k_cache=kc[0])),
        ("batch", dict(k_cache=kc[:1], v_cache=vc[:1])),
    ]
    m4, e4 = ref.bfp_quantize(kc.cpu(), 4, 32, False)
    bad.append(("mxint8", dict(k_cache=BFPTensor(m4.to(device), e4.to(device), "mxint4",
                                                 tuple(kc.shape)), v_cache=vc)))
    m8, e8 = ref.bfp_quantize(kc.cpu(), 8, 32, False)
    bad.append(("v_cache", dict(k_cache=as_bfp(m8.to(device), e8.to(device)), v_cache=vc)))
    for pattern, over in bad:
        args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=sl) | over
        with pytest.raises((ValueError, TypeError), match=pattern):
            ops.decode_attention(**args)


def test_kv_cache_append_bad_inputs(device):
    q, kc, vc, _ = _bad_base(device)
    i32 = dict(dtype=torch.int32, device=device)
    k = randn((2, 3, 2, 64), q.dtype, device)
    start = torch.tensor([0, 17], **i32)
    pk, pv = kc.reshape(8, 5, 2, 64), vc.reshape(8, 5, 2, 64)
    table = torch.arange(8, **i32).reshape(2, 4)
    bad = [
        ("start_pos", dict(start_pos=torch.tensor([0, 18], **i32))),
        ("start_pos", dict(start_pos=torch.tensor([-1, 0], **i32))),
        ("start_pos", dict(start_pos=start.long())),
        ("start_pos", dict(start_pos=start[:1])),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=torch.tensor(
            [[0, 1, 2, 3], [4, 5, 6, 9]], **i32))),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table.long())),
        ("block_table", dict(k_cache=pk, v_cache=pv, block_table=table[:1])),
        ("start_pos", dict(k_cache=pk, v_cache=pv, block_table=table[:, :3])),
        ("head_dim", dict(k=k[..., :32], v=k[..., :32])),
        ("float32, bfloat16 or float16", dict(k_cache=kc.double(), v_cache=vc.double())),
        ("kv heads", dict(k=k[:, :, :1], v=k[:, :, :1])),
        (r"\bk\b", dict(k=k.double(), v=k.double())),
        (r"\bv\b", dict(v=k[:, :2])),
        ("batch", dict(k_cache=kc[:1], v_cache=vc[:1])),
    ]
    m4, e4 = ref.bfp_quantize(kc.cpu(), 4, 32, False)
    bad.append(("mxint8", dict(k_cache=BFPTensor(m4.to(device), e4.to(device), "mxint4",
                                                 tuple(kc.shape)),
                               v_cache=BFPTensor(m4.to(device), e4.to(device), "mxint4",
                                                 tuple(kc.shape)))))
    for pattern, over in bad:
        args = dict(k_cache=kc, v_cache=vc, k=k, v=k, start_pos=start) | over
        before = [bits(t) for t in (kc, vc)]
        with pytest.raises((ValueError, TypeError), match=pattern):
            ops.kv_cache_append(**args)
        assert all(torch.equal(b, bits(t)) for b, t in zip(before, (kc, vc), strict=True)), \
            f"a rejected append ({pattern}) wrote to the cache"


def test_binding_checks(device):
    """The ops themselves (no Python face) reject bad shapes and dtypes with a message that
    names the argument (docs/ops.md: checks at the boundary). Every case is tried; all misses are
    reported together."""
    need_kernel("decode_attention", device)
    need_kernel("kv_cache_append", device)
    q, kc, vc, sl = _bad_base(device)
    s = 0.125
    i32 = dict(dtype=torch.int32, device=device)
    k = randn((2, 3, 2, 64), q.dtype, device)
    start = torch.tensor([0, 1], **i32)
    attend = torch.ops.llmcore.decode_attention
    append = torch.ops.llmcore.kv_cache_append
    cases = [
        ("cache_seqlens", attend, (q, kc, vc, sl.long(), s, None, None, None)),
        ("cache_seqlens", attend, (q, kc, vc, sl[:1], s, None, None, None)),
        ("block_table", attend, (q, kc, vc, sl, s, sl.reshape(2, 1).long(), None, None)),
        ("block_table", attend, (q, kc, vc, sl, s, torch.zeros((1, 4), **i32), None, None)),
        ("head_dim|k_cache", attend, (q, kc[..., :32].contiguous(), vc[..., :32].contiguous(),
                                      sl, s, None, None, None)),
        ("k_cache|dtype", attend, (q, kc.double(), vc.double(), sl, s, None, None, None)),
        ("exponent", attend, (q, kc.to(torch.int8), vc.to(torch.int8), sl, s, None, None,
                              None)),
        ("kv_heads", attend, (q[:, :, :3], kc, vc, sl, s, None, None, None)),
        ("start_pos", append, (kc, vc, k, k, start.long(), None, None, None)),
        ("block_table", append, (kc, vc, k, k, start, start.reshape(2, 1).long(), None, None)),
        ("head_dim|k_cache", append, (kc, vc, k[..., :32], k[..., :32], start, None, None,
                                      None)),
    ]
    misses = []
    for pattern, op, args in cases:
        try:
            op(*args)
        except (RuntimeError, ValueError, TypeError) as e:
            if not re.search(pattern, str(e)):
                misses.append(f"{op.__name__} expected /{pattern}/, got: {str(e)[:200]}")
        else:
            misses.append(f"{op.__name__} accepted a bad input (expected /{pattern}/)")
    assert not misses, "\n".join(misses)


def test_unvalidated_inputs_stay_in_bounds(device):
    """validate=False with lengths / start positions / page ids out of range: no crash, no
    read or write outside the cache (its neighbours in memory are poison and stay intact;
    the outputs stay finite); a clear exception is also acceptable. Run in a subprocess so
    a crash is a failure, not the end of the test run."""
    proc = run_program("decode_unvalidated", device.type, timeout=300)
    assert proc.returncode == 0, (f"the process died (rc {proc.returncode}):\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    problems = []
    for r in json.loads(line[len("RESULTS "):]):
        if "error" in r:
            if "illegal memory access" in r["error"] or "CUDA error" in r["error"]:
                problems.append(f"{r['name']}: {r['error']}")
        elif not (r["finite"] and r["guards_intact"]):
            problems.append(f"{r['name']}: finite output {r['finite']}, memory around the "
                            f"cache intact {r['guards_intact']}")
    assert not problems, "\n".join(problems)



@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_decode_bad_softmax_scale(scale, device):
    q, kc, vc, seqlens = _bad_base(device)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.decode_attention(q, kc, vc, seqlens, softmax_scale=scale)


NAN = float("nan")
DECODE_NONFINITE = {
    # garbage past cache_seqlens (and on a sequence of length 0) never reaches an output
    "beyond length": lambda q, kc, vc: (kc[:, 40:].fill_(NAN), vc[:, 40:].fill_(NAN),
                                        vc[0].fill_(float("inf"))),
    # the last new token's value is hidden from the earlier new tokens
    "hidden new token": lambda q, kc, vc: vc[1, 39].fill_(NAN),
    "visible NaN": lambda q, kc, vc: vc[1, 7, 1, 3:4].fill_(NAN),
    "NaN query": lambda q, kc, vc: q[1, 0, 2].fill_(NAN),
}


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("case", list(DECODE_NONFINITE))
def test_decode_nonfinite_rules(case, q_len, isa, device):
    """The attention rule: a NaN a row sees propagates, a masked value (past the length,
    or a later new token) never reaches an output; both CPU paths and the reference agree."""
    if device.type != "cpu":
        pytest.skip("the CPU kernels (CUDA: see docs/ops.md)")
    b, cap, hkv, h, d = 3, 48, 2, 4, 32
    q = randn((b, q_len, h, d), torch.float32, device)
    kc, vc = (randn((b, cap, hkv, d), torch.float32, device) for _ in range(2))
    DECODE_NONFINITE[case](q, kc, vc)
    seqlens = torch.tensor([0, 40, 17], dtype=torch.int32, device=device)
    out, lse = ops.decode_attention(q, kc, vc, seqlens, return_lse=True)
    want_out, want_lse = ref.decode_attention(q, kc, vc, seqlens, d ** -0.5)
    assert_close_nan(out, want_out, 1e-4, f"{case} out")
    assert_close_nan(lse, want_lse, 1e-4, f"{case} lse")
    if case in ("beyond length", "hidden new token"):
        assert torch.isfinite(out[:, :-1]).all()


@pytest.mark.parametrize("validate", [True, False])
def test_paged_cache_page_size_zero(validate):
    q = torch.randn(1, 1, 2, 16)
    kc = torch.randn(4, 0, 2, 16)
    bt = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="page_size"):
        ops.decode_attention(q, kc, kc, torch.tensor([0], dtype=torch.int32), block_table=bt,
                             validate=validate)
