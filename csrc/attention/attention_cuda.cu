// Dispatch of the fused attention launchers (attention_cuda.cuh) to the per-(head_dim,
// dtype) instantiations in generated/, and the small memory-bound kernels around the
// backward: dsum = rowsum(dO * O), dq_accum (fp32) -> dq, and the GQA group sums of the
// per-query-head dK/dV.
//
// The row-wise kernels see dense and varlen alike as "tokens": dense [B, S, H, D] rows
// are (b, i) with b = token / S; a varlen [T, H, D] tensor is one batch of T rows, and its
// lse/dsum [H, T] index h * T + token (lse_batch_stride 0).
//
// Compile alone: nvcc -std=c++17 -O3 -Icsrc -c csrc/attention/attention_cuda.cu
//   -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
#include "attention/flash_common.cuh"

namespace llmcore {
namespace attention {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;  // 8 warps, one (token, head) row per warp

// dsum[row of (b, h)] = sum_d dO * O in fp32. rows_per_batch = Sq (dense) or Tq (varlen).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
bwd_dsum_kernel(const BwdParams p, int64_t tokens, int64_t rows_per_batch) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= tokens * p.heads) return;
  const int64_t token = w / p.heads;
  const int h = static_cast<int>(w % p.heads);
  const int64_t b = token / rows_per_batch, i = token % rows_per_batch;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride +
               h * p.do_head_stride;
  float acc = 0.0f;
  for (int c = lane; c < p.head_dim; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.dsum[b * p.lse_batch_stride + h * p.lse_head_stride + i] = acc;
}

// dq (T, strided) = dq_accum (fp32, contiguous [tokens, H, D]); the scale is already in.
template <typename T>
__global__ void bwd_dq_convert_kernel(const BwdParams p, int64_t tokens, int64_t rows_per_batch) {
  const int64_t n = tokens * p.heads * p.head_dim;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % p.head_dim, hh = (e / p.head_dim) % p.heads, token = e / (p.head_dim * int64_t(p.heads));
    const int64_t b = token / rows_per_batch, i = token % rows_per_batch;
    const float x = p.dq_accum[b * p.acc_q_batch_stride + (i * p.heads + hh) * p.head_dim + c];
    static_cast<T*>(p.dq)[b * p.dq_batch_stride + i * p.dq_row_stride + hh * p.dq_head_stride + c] =
        from_float<T>(x);
  }
}

// dk[token, hk] = sum over the group's query heads hk * G .. hk * G + G - 1 of dk_accum
// (fp32 [tokens, H, D]), summed in head order: deterministic. Same for dv.
template <typename T>
__global__ void bwd_group_sum_kernel(const BwdParams p, int64_t tokens, int64_t rows_per_batch) {
  const int group = p.heads / p.kv_heads;
  const int64_t n = tokens * p.kv_heads * p.head_dim;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % p.head_dim, hk = (e / p.head_dim) % p.kv_heads,
                  token = e / (p.head_dim * int64_t(p.kv_heads));
    const int64_t b = token / rows_per_batch, i = token % rows_per_batch;
    const int64_t src = b * p.acc_k_batch_stride + (i * p.heads + hk * group) * p.head_dim + c;
    float sk = 0.0f, sv = 0.0f;
    for (int g = 0; g < group; ++g) {
      sk += p.dk_accum[src + g * p.head_dim];
      sv += p.dv_accum[src + g * p.head_dim];
    }
    static_cast<T*>(p.dk)[b * p.dk_batch_stride + i * p.dk_row_stride + hk * p.dk_head_stride + c] =
        from_float<T>(sk);
    static_cast<T*>(p.dv)[b * p.dv_batch_stride + i * p.dv_row_stride + hk * p.dv_head_stride + c] =
        from_float<T>(sv);
  }
}

unsigned elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65536 * 8 ? blocks : 65536 * 8);  // grid-stride beyond
}

// One case per generated instantiation (generated/head_dims.h lists the head dims).
template <typename T>
cudaError_t dispatch_fwd(const FwdParams& p, cudaStream_t stream) {
#define LLMCORE_FWD_CASE(D) \
  case D: return run_flash_fwd<T, D>(p, stream);
  switch (p.head_dim) {
    LLMCORE_ATTENTION_FWD_HEAD_DIMS(LLMCORE_FWD_CASE)
    default: return cudaErrorInvalidValue;
  }
#undef LLMCORE_FWD_CASE
}

template <typename T>
cudaError_t dispatch_bwd_kernels(const BwdParams& p, cudaStream_t stream) {
#define LLMCORE_BWD_CASE(D) \
  case D: return run_flash_bwd<T, D>(p, stream);
  switch (p.head_dim) {
    LLMCORE_ATTENTION_BWD_HEAD_DIMS(LLMCORE_BWD_CASE)
    default: return cudaErrorInvalidValue;
  }
#undef LLMCORE_BWD_CASE
}

template <typename T>
cudaError_t bwd(const BwdParams& p, cudaStream_t stream) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  // Tokens of q and k, and rows per "batch" for the row-wise kernels (see the top).
  const int64_t tq = varlen ? p.total_q : static_cast<int64_t>(p.batch) * p.seqlen_q;
  const int64_t tk = varlen ? p.total_k : static_cast<int64_t>(p.batch) * p.seqlen_k;
  const int64_t rq = varlen ? (p.total_q > 0 ? p.total_q : 1) : (p.seqlen_q > 0 ? p.seqlen_q : 1);
  const int64_t rk = varlen ? (p.total_k > 0 ? p.total_k : 1) : (p.seqlen_k > 0 ? p.seqlen_k : 1);
  if (tq > 0) {
    const int64_t warps = tq * p.heads;
    const int64_t blocks = (warps + kRowThreads / 32 - 1) / (kRowThreads / 32);
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    bwd_dsum_kernel<T><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(p, tq, rq);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = dispatch_bwd_kernels<T>(p, stream);
  if (err != cudaSuccess) return err;
  if (!p.deterministic && tq > 0) {
    bwd_dq_convert_kernel<T><<<elementwise_blocks(tq * p.heads * p.head_dim), 256, 0, stream>>>(p, tq, rq);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.heads != p.kv_heads && tk > 0) {
    bwd_group_sum_kernel<T><<<elementwise_blocks(tk * p.kv_heads * p.head_dim), 256, 0, stream>>>(p, tk, rk);
    err = cudaGetLastError();
  }
  return err;
}

bool params_ok(const FwdParams& p) {
  if (p.batch < 0 || p.heads < 0 || p.kv_heads <= 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return false;
  if (p.heads % p.kv_heads != 0) return false;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return false;
  return p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
}

}  // namespace

cudaError_t attention_fwd(const FwdParams& p, cudaStream_t stream) {
  if (!params_ok(p) || !fwd_head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  return p.dtype == DType::kFloat16 ? dispatch_fwd<__half>(p, stream)
                                    : dispatch_fwd<__nv_bfloat16>(p, stream);
}

cudaError_t attention_bwd(const BwdParams& p, cudaStream_t stream) {
  if (!params_ok(p) || !bwd_head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  return p.dtype == DType::kFloat16 ? bwd<__half>(p, stream) : bwd<__nv_bfloat16>(p, stream);
}

}  // namespace cuda
}  // namespace attention
}  // namespace llmcore
