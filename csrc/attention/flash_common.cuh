// Device helpers of the attention kernels: fragment packing, quad reductions, 16-byte tile
// copies with zero-fill, per-sequence geometry, the BOOL_SWITCH dispatch. The PTX wrappers
// (ptx::) are common/ptx.cuh's, the element conversions common/half_convert.cuh's. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "attention/attention_cuda.cuh"
#include "attention/flash_layout.h"
#include "common/half_convert.cuh"
#include "common/kernel_setup.h"
#include "common/ptx.cuh"

// Turns a run-time bool into a compile-time constant NAME for the body (flash-attention's
// static_switch.h).
#define LLMCORE_BOOL_SWITCH(COND, NAME, ...)     \
  [&] {                                          \
    if (COND) {                                  \
      constexpr bool NAME = true;                \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr bool NAME = false;               \
      return __VA_ARGS__();                      \
    }                                            \
  }()

namespace llmcore {
namespace attention {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// The C registers of one 16x16 slice (two n8 accumulator tiles c0, c1) as an A operand:
// a0 = (row g, k 2t..) = c0[0..1], a1 = (row g+8) = c0[2..3], a2 = (row g, k 8+2t..) =
// c1[0..1], a3 = c1[2..3].
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4],
                                       const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Reductions over the 4 threads of a quad (the threads that share an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- tiles ---------------------------------------------------------------------------
// Copies rows [0, ROWS) of a [rows, D] slab (row stride ld elements, 16-byte aligned rows)
// into a padded shared tile [ROWS][D + kPad]. Rows >= valid_rows are zero-filled and never
// read (their source address is the always-valid `fallback`).
template <int ROWS, int D, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t ld, int valid_rows,
                                          const T* fallback, int tid) {
  constexpr int kChunksPerRow = D / 8, kChunks = ROWS * kChunksPerRow;
  constexpr int kStride = layout::smem_stride(D);
  static_assert(D % 8 == 0, "rows are copied in 16-byte chunks");
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    if (kChunks % kThreads != 0 && idx >= kChunks) break;
    const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
    const bool ok = r < valid_rows;
    ptx::cp_async_16(smem + r * kStride + c * 8, ok ? gmem + r * ld + c * 8 : fallback,
                     ok ? 16 : 0);
  }
}

// ---- sequence geometry ----------------------------------------------------------------
struct SeqInfo {
  int64_t q_off, k_off;  // first row of the sequence in the (packed) tensors
  int sq, sk;            // its lengths
};

__device__ __forceinline__ SeqInfo seq_info(const FwdParams& p, int b) {
  if (p.cu_seqlens_q == nullptr) return {0, 0, p.seqlen_q, p.seqlen_k};
  // Clamped to the packed tensors so that even a malformed table stays in bounds.
  auto clamp = [](int64_t x, int64_t hi) { return x < 0 ? int64_t(0) : (x > hi ? hi : x); };
  const int64_t q0 = clamp(p.cu_seqlens_q[b], p.total_q);
  const int64_t q1 = clamp(p.cu_seqlens_q[b + 1], p.total_q);
  const int64_t k0 = clamp(p.cu_seqlens_k[b], p.total_k);
  const int64_t k1 = clamp(p.cu_seqlens_k[b + 1], p.total_k);
  return {q0, k0, static_cast<int>(q1 > q0 ? q1 - q0 : 0), static_cast<int>(k1 > k0 ? k1 - k0 : 0)};
}

// Opt a kernel into more than 48 KB of dynamic shared memory when it needs it: once per
// (kernel, device), not per launch (common/kernel_setup.h).
template <typename Kernel>
inline cudaError_t set_smem(Kernel kernel, int bytes) {
  return cuda_setup::ensure_dynamic_smem(kernel, bytes);
}

}  // namespace cuda
}  // namespace attention
}  // namespace llmcore
