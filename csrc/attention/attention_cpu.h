// Fused attention on the CPU, forward and backward, dense and varlen (docs/attention.md).
// Framework-free (raw pointers, sizes, strides; no torch): the torch binding is
// attention_cpu_binding.cpp, and a plain cmake target compiles these files for native tests.
//
// What
//   out[i] = sum_j softmax_j(scale * q_i . k_j) v_j  over the keys j that query i sees,
//   lse[i] = log sum_j exp(scale * q_i . k_j)   (natural log; -inf when i sees no key).
//   Query head h reads kv head h / (heads / kv_heads) (GQA/MQA). With `causal`, query i of a
//   sequence sees keys j <= i + len_k - len_q (bottom-right aligned, as flash-attn). A row
//   that sees no key gets out = 0, lse = -inf and zero gradients.
//
// Shapes: every tensor is a view [batch][token][head][dim]: element (b, t, h, d) lives at
//   data + b * batch_stride + t * row_stride + h * head_stride + d   (dim contiguous).
// Dense batches: cu_seqlens null, every sequence has seq_q / seq_k tokens. Packed (varlen)
// batches: batch_stride 0 and sequence b is tokens cu_seqlens[b] .. cu_seqlens[b+1]; the
// dense case is the varlen one with uniform offsets, and both run the same code. lse (and
// the backward's `delta` scratch) is [batch][head][token] with strides lse_batch_stride,
// lse_head_stride, 1 (dense [B, H, Sq]: H*Sq, Sq; varlen [H, Tq]: 0, Tq).
//
// Algorithm (FlashAttention-2 on fp32 tiles)
//   forward   per (b, h, block of kBlockQ queries): stream kBlockK-key tiles (converted to
//             fp32 once per tile, K transposed), S = (scale Q) K^T by a register-blocked
//             microkernel, online softmax (running max m and sum l; the accumulator is
//             rescaled when m grows), O += P V; tiles past the causal diagonal are skipped.
//   backward  delta_i = rowsum(dO_i * O_i); then two passes that each own their outputs, so
//             the result never depends on thread scheduling (always deterministic), or
//             with many (b, kv head) pairs one fused pass (attention_bwd_fused):
//             (1) per (b, kv head, key block): for every query head of the group and query
//                 block, P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
//                 dK += scale dS^T Q;  (2) per (b, h, query block): dQ += scale dS K.
//   Everything accumulates in fp32; bf16/fp16 outputs are rounded to nearest even once.
//
// Threading is the caller's: each entry point takes a [begin, end) range of work items
// (see the *_items functions) and may run concurrently on disjoint ranges.
// ISA: AVX-512 microkernels when the CPU has AVX-512F (checked at run time), otherwise a
// portable scalar path; LLMCORE_CPU_ISA=scalar forces the portable path (read on each
// call; "avx2" also selects it, there is no AVX2-specific path).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/cpu_isa.h"
#include "common/dtype.h"

namespace llmcore {
namespace attention {
namespace cpu {

// kAvx512 or kScalar (common/cpu_isa.h).
Isa active_isa();

constexpr int64_t kBlockQ = 128;  // query rows per work item / tile
constexpr int64_t kBlockK = 64;  // keys per tile (the microkernels' fixed width)

struct ConstView {
  const void* data;
  int64_t batch_stride, row_stride, head_stride;  // in elements
};
struct View {
  void* data;
  int64_t batch_stride, row_stride, head_stride;
};

// The problem both directions share. q/k/v (and out, grad_out) have `dtype`.
struct Problem {
  DType dtype;
  int64_t batch, heads, kv_heads, head_dim;
  int64_t seq_q, seq_k;          // dense lengths (ignored with cu_seqlens)
  const int32_t* cu_seqlens_q;   // [batch + 1] or null (dense)
  const int32_t* cu_seqlens_k;   // [batch + 1] or null (dense)
  int64_t max_seqlen_q, max_seqlen_k;  // upper bounds of the lengths (the work split)
  bool causal;
  float scale;
  ConstView q, k, v;
  int64_t lse_batch_stride, lse_head_stride;
};

// ---- forward ----------------------------------------------------------------------------
// Work items: batch * heads * ceil(max_seqlen_q / kBlockQ).
int64_t fwd_items(const Problem& p);
// out: q-shaped view of type dtype; lse float32 (strides from p).
void attention_fwd(const Problem& p, View out, float* lse, int64_t item_begin, int64_t item_end);

// ---- backward ---------------------------------------------------------------------------
struct Backward {
  ConstView out, grad_out;  // dtype, q-shaped
  const float* lse;         // as written by the forward (p's lse strides)
  float* delta;             // scratch with lse's layout, filled by attention_bwd_delta
  View grad_q, grad_k, grad_v;  // dtype, shaped like q, k, v
};
// Step 0, items fwd_items(p): delta = rowsum(grad_out * out).
void attention_bwd_delta(const Problem& p, const Backward& g, int64_t item_begin,
                         int64_t item_end);
// Step 1, items bwd_kv_items(p) = batch * kv_heads * ceil(max_seqlen_k / kBlockK): grad_k,
// grad_v (every row of them is written, zero where no query sees the key).
int64_t bwd_kv_items(const Problem& p);
void attention_bwd_kv(const Problem& p, const Backward& g, int64_t item_begin, int64_t item_end);
// Step 2, items fwd_items(p): grad_q.
void attention_bwd_q(const Problem& p, const Backward& g, int64_t item_begin, int64_t item_end);

// Steps 1 and 2 in one pass (5 tile products per tile pair instead of 7), chosen by the
// problem's shape alone (so results never depend on the thread count): when
// batch * kv_heads >= kFusedMinItems there is enough parallelism in whole (b, kv head)
// items, each of which owns its dK/dV rows and the dQ rows of its query heads.
constexpr int64_t kFusedMinItems = 8;
bool bwd_fused(const Problem& p);
int64_t bwd_fused_items(const Problem& p);  // batch * kv_heads
void attention_bwd_fused(const Problem& p, const Backward& g, int64_t item_begin,
                         int64_t item_end);

}  // namespace cpu
}  // namespace attention
}  // namespace llmcore
