"""Every llmcore CUDA kernel once, at small sizes, for compute-sanitizer (memcheck,
racecheck): run by benchmarks/gpu/run.sh as ``compute-sanitizer --tool T python3 this``.
It checks nothing itself beyond finiteness; the sanitizer's report is the result. The
shapes include the cases of the no-key-tile race (causal q > k, a varlen sequence with no
key, deterministic dQ), GQA, a paged decode cache with out-of-range page ids, MXINT8 and
split-KV decoding.

    python3 benchmarks/gpu/sanitize_cases.py [--list] [--device cuda|cpu]

``--device cpu`` runs the same calls on the CPU kernels (tests/test_gpu_script.py does, so
that this program cannot rot where no GPU is).
"""

from __future__ import annotations

import sys

import torch


def cases(dev: torch.device):
    from llmcore import ops

    h16 = torch.float16

    def rnd(*shape, dtype=h16):
        return torch.randn(*shape, device=dev).to(dtype)

    def attention_dense():
        # causal q 300 > k 40: the first query blocks have no key tile; GQA 4:2
        q, k, v = rnd(1, 300, 4, 128), rnd(1, 40, 2, 128), rnd(1, 40, 2, 128)
        for t in (q, k, v):
            t.requires_grad_(True)
        out = ops.attention(q, k, v, causal=True)
        out.float().sum().backward()
        return out, q.grad, k.grad

    def attention_deterministic():
        q, k, v = rnd(1, 200, 2, 64), rnd(1, 24, 2, 64), rnd(1, 24, 2, 64)
        for t in (q, k, v):
            t.requires_grad_(True)
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            out = ops.attention(q, k, v, causal=True)
            out.float().sum().backward()
        finally:
            torch.use_deterministic_algorithms(prev)
        return out, q.grad

    def attention_varlen():
        lq, lk = [128, 4, 33], [0, 8, 50]
        cq = torch.tensor([0, 128, 132, 165], dtype=torch.int32, device=dev)
        ck = torch.tensor([0, 0, 8, 58], dtype=torch.int32, device=dev)
        q, k, v = rnd(sum(lq), 4, 64), rnd(sum(lk), 1, 64), rnd(sum(lk), 1, 64)
        for t in (q, k, v):
            t.requires_grad_(True)
        out = ops.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=True)
        out.float().sum().backward()
        return out, q.grad, v.grad

    def decode_paged():
        # 2 sequences, page 16, one page id past the end and one -1 (absent keys)
        pages, page, hkv, d = 12, 16, 2, 128
        kc, vc = rnd(pages, page, hkv, d), rnd(pages, page, hkv, d)
        table = torch.arange(8, dtype=torch.int32, device=dev).view(2, 4)
        table[0, 1], table[1, 0] = pages + 3, -1
        lens = torch.tensor([50, 45], dtype=torch.int32, device=dev)
        q = rnd(2, 4, 8, d)
        return ops.decode_attention(q, kc, vc, lens, block_table=table, validate=False),

    def decode_split_mxint8():
        # one sequence, long cache: several key splits; MXINT8 cache written by append
        b, cap, hkv, d = 1, 4096, 1, 128
        km = torch.zeros(b, cap, hkv, d, dtype=torch.int8, device=dev)
        ke = torch.zeros(b, cap, hkv, d // 32, dtype=torch.uint8, device=dev)
        vm, ve = torch.zeros_like(km), torch.zeros_like(ke)
        kc = ops.BFPTensor(km, ke, "mxint8", tuple(km.shape), h16)
        vc = ops.BFPTensor(vm, ve, "mxint8", tuple(vm.shape), h16)
        start = torch.zeros(b, dtype=torch.int32, device=dev)
        ops.kv_cache_append(kc, vc, rnd(b, 3000, hkv, d), rnd(b, 3000, hkv, d), start)
        lens = torch.full((b,), 3000, dtype=torch.int32, device=dev)
        return ops.decode_attention(rnd(b, 1, 4, d), kc, vc, lens),

    def bfp_kernels():
        w = ops.bfp_quantize(rnd(256, 512), "mxint8")
        x1, x8 = rnd(1, 512), rnd(8, 512)
        outs = [ops.bfp_dequantize(w, h16), ops.bfp_linear(x1, w), ops.bfp_linear(x8, w),
                ops.bfp_linear(rnd(64, 512), w, act_format="mxint8")]
        return tuple(outs)

    return [attention_dense, attention_deterministic, attention_varlen, decode_paged,
            decode_split_mxint8, bfp_kernels]


def main(argv) -> int:
    if "--list" in argv:
        print("\n".join(c.__name__ for c in cases(torch.device("cpu"))))
        return 0
    dev = torch.device(argv[argv.index("--device") + 1] if "--device" in argv else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_cases: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failed = 0
    for case in cases(dev):
        try:
            outs = case()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            bad = [i for i, t in enumerate(outs) if not torch.isfinite(t.float()).all()]
            print(f"{case.__name__}: {'non-finite output ' + str(bad) if bad else 'ok'}")
            failed += bool(bad)
        except Exception as e:  # report and go on: the sanitizer's findings matter most
            print(f"{case.__name__}: {type(e).__name__}: {str(e)[:300]}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
