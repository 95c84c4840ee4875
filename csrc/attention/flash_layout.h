// Index maps of the attention kernels' tensor-core fragments, shared by the kernels
// (flash_*.cuh) and the host emulation test (cmake/tests/test_attention_layout.cpp).
// Plain C++ (no CUDA headers needed): every function is constexpr and host+device.
//
// mma.sync.aligned.m16n8k16 (f16/bf16 in, f32 accumulate), PTX ISA; lane = 0..31,
// g = lane / 4 (the "group"), t = lane % 4 (the thread in the quad):
//   A 16x16 (row-major), 4 regs of 2 elements: reg r holds A[g + 8 (r & 1)][2t + 8 (r >> 1)
//     + {0, 1}]
//   B 16x8 (k x n), 2 regs: reg r holds B[2t + 8 r + {0, 1}][g]
//   C/D 16x8 fp32, 4 regs: reg r holds C[g + 8 (r >> 1)][2t + (r & 1)]
// ldmatrix.m8n8.x4: lanes 8i .. 8i+7 give the row addresses of 8x8 matrix i; result reg i
//   holds matrix i's (row g, cols 2t, 2t+1), or with .trans its (rows 2t, 2t+1, col g).
//
// Shared-memory tiles are row-major [rows][D + kPad] of 16-bit elements: padding a row by
// one 16-byte chunk makes its length an odd number of chunks, so the 8 row addresses of
// an ldmatrix phase (and the 16-byte cp.async stores) fall in 8 distinct 16-byte bank
// groups for every head dim, 96 included (an XOR swizzle needs a power-of-two row).
#pragma once

#include "common/host_device.h"

namespace llmcore {
namespace attention {
namespace layout {

constexpr int kPad = 8;  // elements (16 bytes) of padding per shared row

// Row stride (elements) of a padded shared tile whose rows hold `cols` elements.
constexpr int smem_stride(int cols) { return cols + kPad; }

// ldmatrix.x4 address of `lane` for the A operand of a 16x16 tile at (r0, c0) of a
// row-major [m][k] tile: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
// (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) -> A regs 0..3.
// The same addresses with .trans give, for a row-major [k][n] tile (e.g. V [key][d]),
// the B operands of the two n8 tiles at columns c0 and c0 + 8 (regs 0,1 and 2,3).
LLMCORE_HD constexpr int ldm_a_row(int lane) { return lane % 16; }
LLMCORE_HD constexpr int ldm_a_col(int lane) { return 8 * (lane / 16); }

// ldmatrix.x4 address of `lane` for the B operands of two n8 tiles at rows n0, n0 + 8 of a
// row-major [n][k] tile (e.g. K [key][d] for S = Q K^T), k = c0 .. c0 + 15: matrices
// (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> regs (b0, b1) of
// tile n0, (b0, b1) of tile n0 + 8.
// The same addresses with .trans give the A operand of a 16x16 tile of a matrix stored
// transposed, i.e. A[m][k] = X[k][m] with X row-major [k][m] (dS from dS^T [key][query]):
// (rows = k 0-7, cols = m 0-7) -> a0, (k 0-7, m 8-15) -> a1, (k 8-15, m 0-7) -> a2, ...
LLMCORE_HD constexpr int ldm_b_row(int lane) { return lane % 8 + 8 * (lane / 16); }
LLMCORE_HD constexpr int ldm_b_col(int lane) { return 8 * ((lane / 8) % 2); }

// Row / column within a 16x8 accumulator tile of C register r held by `lane`.
LLMCORE_HD constexpr int c_row(int lane, int r) { return lane / 4 + 8 * (r >> 1); }
LLMCORE_HD constexpr int c_col(int lane, int r) { return 2 * (lane % 4) + (r & 1); }

// ---- the causal / tail geometry (bottom-right causal: query i sees key j <= i + sk - sq)
// Whether query row i (of a sequence of sq queries) sees key j (of sk keys).
LLMCORE_HD constexpr bool visible(long long i, long long j, long long sq, long long sk, bool causal) {
  return j >= 0 && j < sk && (!causal || j <= i + (sk - sq));
}

// Keys [0, key_limit) hold every key that some query row in [m0, m0 + rows) sees.
LLMCORE_HD constexpr long long key_limit(long long m0, int rows, long long sq, long long sk,
                                         bool causal) {
  if (!causal) return sk;
  const long long lim = m0 + rows + (sk - sq);  // last row m0 + rows - 1 sees keys < this
  return lim < 0 ? 0 : (lim < sk ? lim : sk);
}

// Whether the tile of query rows [m0, ..) x keys [n0, n0 + cols) can hold a pair that is not
// visible for a query row m0 <= i < sq (false: every such pair is visible, skip the mask).
LLMCORE_HD constexpr bool tile_needs_mask(long long m0, long long n0, int cols, long long sq,
                                          long long sk, bool causal) {
  return n0 + cols > sk || (causal && n0 + cols - 1 > m0 + (sk - sq));
}

// The first block of `rows` query rows holding a row that sees key n0 (earlier blocks see
// none of the keys >= n0).
LLMCORE_HD constexpr int first_query_block(long long n0, int rows, long long sq, long long sk,
                                           bool causal) {
  const long long first = n0 - (sk - sq);  // the first row that sees key n0
  return causal && first > 0 ? static_cast<int>(first / rows) : 0;
}

}  // namespace layout
}  // namespace attention
}  // namespace llmcore
