// Shared pieces of the CPU decode kernels (not part of the API in decode_cpu.h): where a
// cache row lives, how a task maps to (sequence, kv head, positions), the workspace layout,
// and the per-ISA task kernels that decode_cpu.cpp chooses between.
#pragma once

#include "decode/decode_cpu.h"

namespace llmcore {
namespace decode {
namespace cpu {

// (dim0 index, row index) of position j of sequence b; dim0 index -1 when the page id is
// outside [0, P) (the position is treated as empty). j must be in [0, capacity).
struct RowLoc {
  int64_t i0, i1;
};
inline RowLoc locate(const CacheLayout& c, int64_t b, int64_t j) {
  if (!c.block_table) return {b, j};
  const int64_t page = c.block_table[b * c.bt_stride + j / c.rows];
  if (page < 0 || page >= c.dim0) return {-1, 0};
  return {page, j % c.rows};
}

// Valid length of sequence b, clamped to [0, capacity].
inline int64_t clamped_length(const DecodeArgs& a, int64_t b) {
  const int64_t cap = capacity(a.layout);
  const int64_t n = a.seqlens[b];
  return n < 0 ? 0 : (n > cap ? cap : n);
}

struct Task {
  int64_t b, kvh;
  int64_t j0, j1;  // positions of this split, clipped to the length
  int64_t length;  // clamped length of sequence b
};
inline Task task_of(const DecodeArgs& a, const DecodePlan& p, int64_t t) {
  Task k;
  const int64_t split = t % p.splits;
  const int64_t g = t / p.splits;
  k.b = g / a.layout.hkv;
  k.kvh = g % a.layout.hkv;
  k.length = clamped_length(a, k.b);
  k.j0 = split * p.chunk;
  k.j1 = k.j0 + p.chunk < k.length ? k.j0 + p.chunk : k.length;
  if (k.j1 < k.j0) k.j1 = k.j0;
  return k;
}

// Workspace of task t: O [rows][head_dim] (already divided by l), then lse [rows].
inline float* task_out(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t) {
  return ws + t * p.rows * (a.head_dim + 1);
}
inline float* task_lse(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t) {
  return task_out(a, p, ws, t) + p.rows * a.head_dim;
}

// Query row r of a task is (t = r / group, g = r % group): head kvh * group + g.
inline int64_t q_offset(const DecodeArgs& a, const DecodePlan& p, int64_t b, int64_t kvh,
                        int64_t r) {
  const int64_t t = r / p.group, g = r % p.group;
  return ((b * a.q_len + t) * a.heads + kvh * p.group + g) * a.head_dim;
}

// One task, same contract as decode_attention_tasks for a single t.
void decode_task_scalar(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t);
#if defined(__x86_64__)
void decode_task_avx512(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t);
#endif

}  // namespace cpu
}  // namespace decode
}  // namespace llmcore
