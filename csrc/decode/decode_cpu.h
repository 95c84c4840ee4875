// KV-cached decoding attention and cache writes on the CPU (docs/decode.md). Framework-free:
// raw pointers, sizes and strides, no torch. The torch binding is decode_cpu_binding.cpp;
// cmake/CMakeLists.txt compiles these files without torch for native tests.
//
// What it computes
//   q [B, Lq, H, D] (contiguous; fp32, bf16 or fp16) attends over a cache of Hkv heads
//   (H % Hkv == 0): query t of sequence b sees keys j <= L_b - Lq + t, where L_b is the
//   valid length (the new tokens included). out [B, Lq, H, D] in q's type, lse [B, H, Lq]
//   fp32 (natural log; a query that sees no key gets out 0 and lse -inf).
//   Cache: contiguous [B, S_max, Hkv, D], or paged [P, page_size, Hkv, D] with a block
//   table [B, max_pages] (position j of sequence b lives in page block_table[b][j / page],
//   row j % page). Elements are q's type, or MXINT8: int8 mantissas plus one E8M0 exponent
//   byte per 32 elements of D (value = m * 2^(e - 127 - 6), byte 255 = NaN block).
//
// Safety (the kernels never read or write out of bounds, whatever the caller validated)
//   - L_b is clamped to [0, capacity] (capacity = S_max, or max_pages * page_size);
//   - a page id outside [0, P) makes its positions empty: decode skips them (as if
//     masked), append skips them (kv_cache_append_rows returns how many rows it skipped;
//     the torch binding rejects such inputs before calling it).
//
// Algorithm (flash-decoding)
//   A task is (b, kv head, split): it walks positions [split * chunk, ...) of sequence b in
//   tiles of 16 rows, reading each K/V row ONCE for all R = (H / Hkv) * Lq query rows of
//   its GQA group (the bandwidth win). Per tile: rows are widened to fp32 (MXINT8: int8 ->
//   fp32 times the block scale, in registers), the R x 16 scores are vectorised dot
//   products, an online softmax (running max m, sum l) rescales the fp32 accumulators, and
//   P [R, 16] x V [16, D] is added. A task leaves (O / l, m + log l) per row in a fp32
//   workspace; decode_attention_merge combines the splits of each row by their logsumexp
//   and writes out / lse. decode_plan picks the split count: long caches are split when
//   B * Hkv tasks would not keep every thread busy.
//
// ISA: AVX-512 (F/BW/VL) when the CPU has it, else a portable path; the environment
// variable LLMCORE_CPU_ISA=scalar forces the portable path (avx2 also maps to it: there is
// no AVX2-specific decode path). Read on each call.
//
// Threading is the caller's: every function takes a [begin, end) range and may run
// concurrently on disjoint ranges.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/cpu_isa.h"
#include "common/dtype.h"

namespace llmcore {
namespace decode {
namespace cpu {

// Element types (common/dtype.h): of q / out / new tokens kFloat32, kBFloat16 or kFloat16;
// of a cache one of those, or kInt8 for MXINT8 (int8 mantissas with exponents beside).
constexpr DType kMxint8 = DType::kInt8;

constexpr int kMxBlock = 32;  // MXINT8 cache: one exponent per 32 elements of D
constexpr int kMxBits = 8;

// kAvx512 or kScalar (common/cpu_isa.h).
Isa active_isa();

// A cache tensor [dim0, rows, hkv, d] (dim0 = B or P, rows = S_max or page_size): element
// strides of dims 0..2 (dim 3 is contiguous), and the same for the exponent tensor
// [dim0, rows, hkv, ceil(d / 32)] of an MXINT8 cache.
struct CacheLayout {
  int64_t dim0, rows, hkv, d;
  int64_t stride0, stride1, stride2;
  int64_t exp_stride0, exp_stride1, exp_stride2;
  const int32_t* block_table;  // null: contiguous cache (dim0 = B)
  int64_t max_pages;           // block table columns
  int64_t bt_stride;           // block table row stride (elements)
};

// Positions a sequence can hold.
inline int64_t capacity(const CacheLayout& c) {
  return c.block_table ? c.max_pages * c.rows : c.rows;
}

struct DecodeArgs {
  const void* q;  // [batch, q_len, heads, head_dim], contiguous
  DType q_type;
  int64_t batch, q_len, heads, head_dim;
  const void* k;  // cache values, or int8 mantissas
  const void* v;
  const uint8_t* k_exp;  // MXINT8 exponents, else null
  const uint8_t* v_exp;
  DType cache_type;
  CacheLayout layout;  // of k and v (same shape and strides; exponents likewise)
  const int32_t* seqlens;  // [batch]
  float scale;
};

struct DecodePlan {
  int64_t group;   // heads / hkv
  int64_t rows;    // query rows per task: group * q_len
  int64_t splits;  // KV splits per (batch, kv head)
  int64_t chunk;   // positions per split (a multiple of 16)
  int64_t tasks;   // batch * hkv * splits
  int64_t groups;  // batch * hkv (units of decode_attention_merge)
};

// threads: how many threads will run the tasks.
DecodePlan decode_plan(const DecodeArgs& a, int threads);
// fp32 workspace the tasks write: tasks * rows * (head_dim + 1).
size_t decode_workspace_floats(const DecodeArgs& a, const DecodePlan& p);
// Tasks [t0, t1) (t = (b * hkv + kv_head) * splits + split).
void decode_attention_tasks(const DecodeArgs& a, const DecodePlan& p, float* workspace,
                            int64_t t0, int64_t t1);
// Merges the splits of (b, kv head) groups [g0, g1) (g = b * hkv + kv_head) into out
// [batch, q_len, heads, head_dim] (q's type, contiguous) and lse [batch, heads, q_len].
void decode_attention_merge(const DecodeArgs& a, const DecodePlan& p, const float* workspace,
                            void* out, float* lse, int64_t g0, int64_t g1);

// ---- cache writes ------------------------------------------------------------------------
struct AppendArgs {
  void* cache;       // values or int8 mantissas
  uint8_t* exp;      // MXINT8 exponents, else null
  DType cache_type;
  CacheLayout layout;
  const void* src;   // [batch, new_tokens, hkv, d], contiguous
  DType src_type; // must equal cache_type for a float cache
  int64_t batch, new_tokens;
  const int32_t* start_pos;  // [batch]
};

// Writes rows [r0, r1) of the batch * new_tokens (b, t) rows at position start_pos[b] + t
// (MXINT8: each 32-element block quantised with bfp_rule.h, round half away from zero,
// bit-exact with llmcore.reference.bfp_quantize). Rows whose position is outside
// [0, capacity) or whose page is outside [0, P) are skipped; returns how many were.
int64_t kv_cache_append_rows(const AppendArgs& a, int64_t r0, int64_t r1);

}  // namespace cpu
}  // namespace decode
}  // namespace llmcore
