"""Direct calls of the attention bindings (torch.ops.llmcore.attention_*) with bad shapes:
each must raise ValueError / RuntimeError, never crash the process, never a missing-kernel
NotImplementedError. Run by tests/test_attention_errors.py in a child process so that a
crash is reported as a failure naming the case.

    python tests/programs/attention_bad_shapes.py DEVICE DTYPE   # e.g. cpu float16

Prints each case and what it raised; exits 1 listing the cases that were not refused.
"""

import sys

import torch

import llmcore._ext  # noqa: F401  (loads the extension: registers torch.ops.llmcore.*)


def main(dev: str, dt: torch.dtype) -> int:
    L = torch.ops.llmcore

    def r(*s, dtype=dt):
        return torch.randn(*s, device=dev).to(dtype)

    q, k, v = r(2, 5, 4, 64), r(2, 7, 2, 64), r(2, 7, 2, 64)
    out, lse, g = r(2, 5, 4, 64), torch.zeros(2, 4, 5, device=dev), r(2, 5, 4, 64)
    qp, kp, vp = r(12, 4, 64), r(15, 2, 64), r(15, 2, 64)
    i32 = dict(dtype=torch.int32, device=dev)
    cq, ck = torch.tensor([0, 5, 12], **i32), torch.tensor([0, 6, 15], **i32)
    outp, lsep, gp = r(12, 4, 64), torch.zeros(4, 12, device=dev), r(12, 4, 64)
    cases = {
        "fwd q 3-D": lambda: L.attention_fwd(q[0], k, v, False, 0.1),
        "fwd k 5-D": lambda: L.attention_fwd(q, k[None], v, False, 0.1),
        "fwd heads not a multiple": lambda: L.attention_fwd(q, r(2, 7, 3, 64), r(2, 7, 3, 64),
                                                            False, 0.1),
        "fwd head_dim mismatch": lambda: L.attention_fwd(q, k[..., :32], v[..., :32], True, .1),
        "fwd k/v seq mismatch": lambda: L.attention_fwd(q, k, v[:, :6], False, 0.1),
        "fwd k/v heads mismatch": lambda: L.attention_fwd(q, k, r(2, 7, 1, 64), False, 0.1),
        "fwd v head_dim mismatch": lambda: L.attention_fwd(q, k, r(2, 7, 2, 32), False, 0.1),
        "fwd batch mismatch": lambda: L.attention_fwd(q, k[:1], v[:1], False, 0.1),
        "fwd dtype mismatch": lambda: L.attention_fwd(q, k.float() if dt != torch.float32
                                                      else k.half(), v, False, 0.1),
        "fwd float64": lambda: L.attention_fwd(q.double(), k.double(), v.double(), False, .1),
        "fwd int": lambda: L.attention_fwd(q.int(), k.int(), v.int(), False, 0.1),
        "fwd zero kv heads": lambda: L.attention_fwd(q, k[:, :, :0], v[:, :, :0], False, 0.1),
        "bwd lse shape": lambda: L.attention_bwd(g, q, k, v, out, lse[:, :, :4], False, .1,
                                                 False),
        "bwd grad_out shape": lambda: L.attention_bwd(g[:, :4], q, k, v, out, lse, False, .1,
                                                      False),
        "bwd out shape": lambda: L.attention_bwd(g, q, k, v, out[..., :32], lse, False, .1,
                                                 True),
        "bwd lse dtype": lambda: L.attention_bwd(g, q, k, v, out, lse.to(dt) if dt !=
                                                 torch.float32 else lse.double(), False, .1,
                                                 False),
        "bwd k/v mismatch": lambda: L.attention_bwd(g, q, k, v[:, :6], out, lse, False, .1,
                                                    False),
        "varlen q 4-D": lambda: L.attention_varlen_fwd(qp[None], kp, vp, cq, ck, 7, 9, False,
                                                       .1),
        "varlen cu int64": lambda: L.attention_varlen_fwd(qp, kp, vp, cq.long(), ck, 7, 9,
                                                          False, .1),
        "varlen cu 2-D": lambda: L.attention_varlen_fwd(qp, kp, vp, cq[None], ck, 7, 9, False,
                                                        .1),
        "varlen cu length mismatch": lambda: L.attention_varlen_fwd(
            qp, kp, vp, cq, torch.tensor([0, 15], **i32), 7, 15, False, .1),
        "varlen heads not a multiple": lambda: L.attention_varlen_fwd(
            qp, r(15, 3, 64), r(15, 3, 64), cq, ck, 7, 9, False, .1),
        "varlen head_dim mismatch": lambda: L.attention_varlen_fwd(
            qp, kp[..., :32], vp[..., :32], cq, ck, 7, 9, False, .1),
        "varlen k/v mismatch": lambda: L.attention_varlen_fwd(qp, kp, vp[:14], cq, ck, 7, 9,
                                                              False, .1),
        "varlen dtype mismatch": lambda: L.attention_varlen_fwd(
            qp, kp.float() if dt != torch.float32 else kp.half(), vp, cq, ck, 7, 9, False,
            .1),
        "varlen bwd lse shape": lambda: L.attention_varlen_bwd(
            gp, qp, kp, vp, outp, lsep[:, :11], cq, ck, 7, 9, False, .1, False),
        "varlen bwd grad_out shape": lambda: L.attention_varlen_bwd(
            gp[:11], qp, kp, vp, outp, lsep, cq, ck, 7, 9, False, .1, False),
    }
    if dev == "cuda":  # what the CUDA kernels do not take must be refused, not crash
        cases["fwd head_dim 80"] = lambda: L.attention_fwd(r(2, 5, 4, 80), r(2, 7, 2, 80),
                                                           r(2, 7, 2, 80), False, 0.1)
        cases["fwd float32"] = lambda: L.attention_fwd(q.float(), k.float(), v.float(), False,
                                                       0.1)
        cases["fwd k on cpu"] = lambda: L.attention_fwd(q, k.cpu(), v, False, 0.1)
        cases["varlen cu on cpu"] = lambda: L.attention_varlen_fwd(qp, kp, vp, cq.cpu(), ck, 7,
                                                                   9, False, .1)
    bad = []
    for name, call in cases.items():
        print("case:", name, flush=True)
        try:
            call()
            if dev == "cuda":
                torch.cuda.synchronize()
            bad.append(f"{name}: no error")
        except NotImplementedError as e:
            bad.append(f"{name}: NotImplementedError (no kernel?) {str(e)[:120]}")
        except (ValueError, RuntimeError) as e:
            print("  ->", type(e).__name__, str(e).splitlines()[0][:160], flush=True)
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__} (want ValueError/RuntimeError): {e}")
    print("BAD:", bad, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], getattr(torch, sys.argv[2])))
