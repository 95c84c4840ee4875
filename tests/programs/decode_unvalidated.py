"""Decoding ops with validate=False and out-of-range lengths, start positions and page ids:
no crash, no read or write outside the cache. Each cache is the middle of a buffer whose
first and last entries are poison; a case records whether the output stayed finite and
the poison intact, or the exception it raised. Run by tests/test_decode_errors.py in a
child process so that a crash is a failure, not the end of the test run.

    python tests/programs/decode_unvalidated.py DEVICE   # cpu or cuda

Prints one line "RESULTS <json list of cases>".
"""

import json
import sys
from functools import partial

import torch

from llmcore import ops
from llmcore.ops import BFPTensor


def main(dev: torch.device) -> int:
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    torch.manual_seed(0)
    b, cap, hkv, d = 2, 24, 2, 64
    q = torch.randn(b, 2, 4, d).to(dtype).to(dev)
    k_new = torch.randn(b, 3, hkv, d).to(dtype).to(dev)
    results = []

    def guarded(shape, tdtype, poison, fill):
        # the cache is the middle of a buffer whose first and last entries are poison
        big = torch.full((shape[0] + 2, *shape[1:]), poison, dtype=tdtype)
        big[1:-1] = fill(shape)
        big = big.to(dev)
        return big, big[1:-1]

    def record(name, fn, bigs):
        print("CASE", name, flush=True)
        before = [bb.clone() for bb in bigs]
        try:
            res = fn()
        except (RuntimeError, ValueError, IndexError) as e:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            results.append(dict(name=name, error=f"{type(e).__name__}: {e}"[:300]))
            return
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ok = True
        if res is not None:
            out, lse = res
            ok = bool(torch.isfinite(out).all()) and not bool(torch.isnan(lse).any())
        guards = all(torch.equal(x[0].view(torch.uint8), y[0].view(torch.uint8)) and
                     torch.equal(x[-1].view(torch.uint8), y[-1].view(torch.uint8))
                     for x, y in zip(bigs, before, strict=True))
        results.append(dict(name=name, finite=ok, guards_intact=guards))

    for layout in ("contiguous", "paged"):
        for storage in ("float", "mxint8"):
            shape = (b, cap, hkv, d) if layout == "contiguous" else (6, 8, hkv, d)
            if storage == "float":
                bk, ck = guarded(shape, dtype, float("nan"), lambda s: torch.randn(s))
                bv, cv = guarded(shape, dtype, float("nan"), lambda s: torch.randn(s))
                bigs, kc, vc = [bk, bv], ck, cv
            else:
                parts = []
                for _ in range(2):
                    bm, m = guarded(shape, torch.int8, -128,
                                    lambda s: torch.randint(-127, 128, s, dtype=torch.int8))
                    be, e = guarded((*shape[:-1], d // 32), torch.uint8, 255,
                                    lambda s: torch.randint(100, 140, s, dtype=torch.uint8))
                    parts += [bm, m, be, e]
                bigs = [parts[0], parts[2], parts[4], parts[6]]
                kc = BFPTensor(parts[1], parts[3], "mxint8", shape, dtype)
                vc = BFPTensor(parts[5], parts[7], "mxint8", shape, dtype)
            tables = [None]
            if layout == "paged":
                good = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev)
                tables = [good]
                for bad in (-1, 6, 2**30, -2**31):
                    t = good.clone()
                    t[1, 1] = bad
                    tables.append(t)
            for ti, table in enumerate(tables):
                lens = [[3, cap + 5], [-3, 5], [2**30, 1], [2**31 - 1, 0]] if ti == 0 else \
                    [[3, 12]]
                for ln in lens:
                    sl = torch.tensor(ln, dtype=torch.int32, device=dev)
                    name = f"{layout}/{storage}/table{ti}/decode lengths {ln}"
                    record(name, partial(ops.decode_attention, q, kc, vc, sl, block_table=table,
                                         return_lse=True, validate=False), bigs)
                starts = [[0, cap - 1], [-2, 0], [2**30, 0], [2**31 - 2, 0]] if ti == 0 else \
                    [[0, 6]]
                for st in starts:
                    sp = torch.tensor(st, dtype=torch.int32, device=dev)
                    name = f"{layout}/{storage}/table{ti}/append start {st}"
                    record(name, partial(ops.kv_cache_append, kc, vc, k_new, k_new, sp,
                                         block_table=table, validate=False), bigs)
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(torch.device(sys.argv[1])))
