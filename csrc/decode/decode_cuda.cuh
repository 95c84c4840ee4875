// Framework-free CUDA launchers for KV-cached decoding (docs/decode.md).
//
//   decode_attention   attention of Lq new tokens per sequence over a KV cache
//                      (flash-decoding: split the keys over CTAs, merge by logsumexp;
//                      decode_attention.cu)
//   kv_cache_append    write new k/v rows into the cache in place, quantising them to
//                      MXINT8 for an int8 cache (kv_cache_append.cu)
//
// Cache geometry. A cache is [dim0, dim1, kv_heads, head_dim] with arbitrary strides for
// its first three dims (last dim contiguous): contiguous [batch, max_seq, ...] when
// block_table is null, paged [num_pages, page_size, ...] otherwise, where position j of
// sequence b lives in page block_table[b * bt_stride + j / page_size], row j % page_size.
// The capacity of a sequence is dim1 (contiguous) or max_pages * page_size (paged).
// Positions outside [0, capacity) and page ids outside [0, num_pages) are never touched:
// the attention kernel treats them as absent keys (excluded from the softmax, exactly as
// if the sequence did not hold them: never scored, not even as 0), the append kernel skips
// those rows.
//
// MXINT8 cache: int8 mantissas [.., head_dim] and E8M0 exponents uint8 [.., ceil(D/32)]
// (value = m * 2^(e - 127 - 6); e = 255 is a NaN block), the same layout as BFPTensor.
//
// Every launcher returns the cudaError_t of its launches, cudaErrorInvalidValue for
// arguments out of contract (never launching then). No torch: the binding is
// decode_cuda_binding.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "common/dtype.h"

namespace llmcore {
namespace decode {
namespace cuda {

// Strides of dims 0, 1, 2 of a 4-D buffer, in its elements (bytes for int8/uint8).
struct Strides3 {
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

// Where position j of sequence b lives (see the header comment).
struct CacheGeometry {
  int64_t dim0 = 0;                       // batch (contiguous) or num_pages (paged)
  int64_t dim1 = 0;                       // max_seq (contiguous) or page_size (paged)
  const int32_t* block_table = nullptr;   // [batch, max_pages] or null (contiguous)
  int64_t bt_stride = 0;                  // row stride of block_table, in int32
  int64_t max_pages = 0;
};

__host__ __device__ inline int64_t cache_capacity(const CacheGeometry& g) {
  return g.block_table == nullptr ? g.dim1 : g.max_pages * g.dim1;
}

struct DecodeAttentionParams {
  const void* q = nullptr;       // [batch, q_len, heads, head_dim], contiguous, `dtype`
  const void* k_cache = nullptr;  // `dtype`, or int8 mantissas when int8_cache
  const void* v_cache = nullptr;
  Strides3 k_strides, v_strides;  // rows (dims 0..2) must be 16-byte aligned, see below
  bool int8_cache = false;
  const uint8_t* k_exponent = nullptr;  // int8_cache only: [dim0, dim1, kv_heads, ceil(D/32)]
  const uint8_t* v_exponent = nullptr;
  Strides3 ke_strides, ve_strides;      // any alignment (byte loads)
  CacheGeometry geo;
  const int32_t* cache_seqlens = nullptr;  // [batch], clamped to [0, capacity] on device
  int batch = 0, q_len = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float softmax_scale = 1.0f;
  DType dtype = DType::kFloat16;  // q, out (and a float cache): kFloat16 or kBFloat16
  void* out = nullptr;            // [batch, q_len, heads, head_dim], contiguous, `dtype`
  float* lse = nullptr;           // [batch, heads, q_len], natural log, -inf if no key
  // Flash-decoding split of the keys (decode_attention_num_splits). With num_splits > 1
  // the caller provides the fp32 workspace: partial_out [batch*heads*q_len*num_splits,
  // head_dim] and partial_lse [batch*heads*q_len*num_splits]
  // (decode_attention_workspace_floats floats in all, partial_lse may point right after
  // partial_out).
  int num_splits = 1;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
};

// Head dims with a kernel: 64, 128 (the tuned ones) and 256; q fp16 or bf16.
inline bool decode_attention_supported(DType dtype, int head_dim) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) &&
         (head_dim == 64 || head_dim == 128 || head_dim == 256);
}

// Requirements on the cache buffers for decode_attention: every row start 16-byte
// aligned (pointer and the byte strides of dims 0..2 multiples of 16). A contiguous
// cache of a supported head_dim from the caching allocator always qualifies.
bool decode_attention_cache_aligned(const DecodeAttentionParams& p);

// Number of key splits for these shapes on `device` (reads the SM count and the kernel's
// occupancy): 1 when batch * kv_heads CTAs already fill the GPU, else the split count
// that fills whole waves best, with at least ~256 keys of capacity per split.
int decode_attention_num_splits(const DecodeAttentionParams& p, int device);

inline int64_t decode_attention_workspace_floats(const DecodeAttentionParams& p,
                                                 int num_splits) {
  if (num_splits <= 1) return 0;
  return static_cast<int64_t>(p.batch) * p.heads * p.q_len * num_splits * (p.head_dim + 1);
}

cudaError_t decode_attention(const DecodeAttentionParams& p, cudaStream_t stream);

struct KvCacheAppendParams {
  const void* k = nullptr;  // [batch, T, kv_heads, head_dim], contiguous, `dtype`
  const void* v = nullptr;
  DType dtype = DType::kFloat16;  // of k/v (and of a float cache): fp32, bf16 or fp16
  void* k_cache = nullptr;        // `dtype`, or int8 mantissas when int8_cache
  void* v_cache = nullptr;
  Strides3 k_strides, v_strides;
  bool int8_cache = false;
  uint8_t* k_exponent = nullptr;  // int8_cache only
  uint8_t* v_exponent = nullptr;
  Strides3 ke_strides, ve_strides;
  CacheGeometry geo;
  const int32_t* start_pos = nullptr;  // [batch]; row t goes to position start_pos[b] + t
  int batch = 0, new_tokens = 0, kv_heads = 0, head_dim = 0;
};

cudaError_t kv_cache_append(const KvCacheAppendParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace decode
}  // namespace llmcore
