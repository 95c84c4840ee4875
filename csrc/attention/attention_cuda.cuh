// Framework-free CUDA launchers of the fused attention ops (docs/attention.md): FlashAttention-2
// style forward and backward, dense and varlen, fp16/bf16, GQA/MQA, bottom-right causal.
//
// The story.
//   forward   out [.., Sq, H, D] = softmax(scale * Q K^T) V, lse = logsumexp(scale * Q K^T)
//             (natural log, fp32): one CTA per (query block, batch, head) streams K/V tiles
//             past its Q tile with an online softmax (flash_fwd.cuh).
//   backward  dsum = rowsum(dO * O) (preprocess kernel), then one CTA per (key block, batch,
//             query head) loops over the query blocks, recomputes P = exp(scale S - lse),
//             accumulates dK, dV in registers and (default) adds dQ into an fp32 buffer
//             with atomics; deterministic=true instead runs a second kernel that computes
//             dQ per query block (flash_bwd.cuh). GQA: dK/dV go per query head to an fp32
//             buffer that a small kernel sums over each kv head's group, in a fixed order.
//   varlen    the same kernels; sequence b of the packed tensors is rows
//             cu_seqlens[b] .. cu_seqlens[b+1]; dense = uniform offsets (null cu_seqlens).
//
// Conventions: raw device pointers, strides in elements, a stream, a cudaError_t back
// (cudaErrorInvalidValue for arguments out of contract, e.g. a head_dim without kernels).
// Tensor data pointers must be 16-byte aligned and every stride except the (unit) last a
// multiple of 8 elements: the kernels copy 16-byte chunks. No torch here; the one torch
// binding is attention_cuda_binding.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

// fwd_head_dim_supported / bwd_head_dim_supported and the head-dim X-macros, generated
// from llmcore/ops/capabilities.py by generate_kernels.py
#include "attention/generated/head_dims.h"
#include "common/dtype.h"

namespace llmcore {
namespace attention {
namespace cuda {

struct FwdParams {
  DType dtype = DType::kFloat16;
  int head_dim = 0;
  int batch = 0, heads = 0, kv_heads = 0;  // heads % kv_heads == 0; head h reads kv head
                                           // h / (heads / kv_heads)
  // Dense: the sequence lengths. Varlen: max_seqlen_q / max_seqlen_k (they size the grid).
  int seqlen_q = 0, seqlen_k = 0;
  // Varlen only: int32 [batch + 1] on the device, and the rows of the packed q and k (the
  // kernels clamp the table's entries to [0, total] so a bad table cannot read out of
  // bounds). Null for dense.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;

  // q [.., Sq, H, D], k/v [.., Sk, Hkv, D], out [.., Sq, H, D]: element (b, row, h, d) at
  // b * batch_stride + row * row_stride + h * head_stride + d. Varlen: batch_stride 0 and
  // row = cu_seqlens[b] + i.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;  // written by the forward; read (saved out) by the backward
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  // lse fp32: row i of (b, h) at b * lse_batch_stride + h * lse_head_stride + row, row as
  // above (dense [B, H, Sq]: H*Sq, Sq; varlen [H, Tq]: 0, Tq).
  float* lse = nullptr;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  float scale = 1.0f;  // softmax scale (any finite value, negative included)
  bool causal = false;  // query i sees key j <= i + Sk - Sq
};

struct BwdParams : FwdParams {
  const void* dout = nullptr;  // [.., Sq, H, D]
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  void* dq = nullptr;  // [.., Sq, H, D], q's dtype
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  void* dk = nullptr;  // [.., Sk, Hkv, D]
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  void* dv = nullptr;  // [.., Sk, Hkv, D]
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // Scratch (all fp32, owned by the caller):
  //  dsum      rowsum(dO * O), laid out as lse (same strides).
  //  dq_accum  [.., Sq, H, D] contiguous (element (b, row, h, d) at b * acc_q_batch_stride
  //            + (row * H + h) * D + d), zero-filled; required unless deterministic.
  //  dk_accum, dv_accum  [.., Sk, H, D] contiguous likewise (acc_k_batch_stride); required
  //            when heads != kv_heads (per-query-head dK/dV, summed over the group after).
  float* dsum = nullptr;
  float* dq_accum = nullptr;
  int64_t acc_q_batch_stride = 0;
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;
  int64_t acc_k_batch_stride = 0;
  bool deterministic = false;  // no atomics: dQ by a separate pass over query blocks
};

// out, lse from q, k, v. seqlen_q == 0 or batch/heads == 0: nothing to do. seqlen_k == 0
// is handled (out = 0, lse = -inf).
cudaError_t attention_fwd(const FwdParams& p, cudaStream_t stream);

// dq, dk, dv from dout, q, k, v, out, lse (p.lse read, not written).
cudaError_t attention_bwd(const BwdParams& p, cudaStream_t stream);

// Per-instantiation launchers (one generated .cu each; T is __half or __nv_bfloat16).
template <typename T, int D> cudaError_t run_flash_fwd(const FwdParams& p, cudaStream_t stream);
template <typename T, int D> cudaError_t run_flash_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace attention
}  // namespace llmcore
