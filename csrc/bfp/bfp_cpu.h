// Block-floating-point CPU kernels: quantise, dequantise, weight-only linear, BFP x BFP GEMM.
// Framework-free (raw pointers, sizes, strides; no torch): the torch binding is
// bfp_cpu_binding.cpp, and a plain cmake target compiles these files for native tests.
//
// Storage (docs/formats.md, csrc/ops.cpp): a row of K values is `mant` (int8 [K], or for
// bits <= 4 uint8 [ceil(K/2)], element 2i in the low nibble) plus `exp` (uint8
// [ceil(K/B)], E8M0 biased by 127, 255 = Inf/NaN block). The per-element rule lives in
// bfp_rule.h; every ISA path here produces exactly the bytes that rule produces.
//
// Algorithms
//   quantize    per block: amax = max|x| (vmaxps on abs), e = exponent field of amax,
//               v = (x * 2^-e) * 2^(b-2) (exact power-of-two scalings), round (half to
//               even: vrndscaleps; half away: trunc + |frac| >= 0.5), clamp, narrow.
//   dequantize  m (int8 -> int32 -> fp32) * block_scale, exact in fp32, then rounded to
//               nearest-even for bf16/fp16 output.
//   linear      decode GEMV (M <= 16): stream W once; per block dequantise 16 weights in
//               registers, FMA against every row of x (fp32), so one W load feeds M rows;
//               per-block partial sums are multiplied by the block scale. Large M is done in
//               the binding (dequantise W chunks + at::mm).
//   gemm        per K block the mantissa dot product is exact in int32 (VNNI vpdpbusd on
//               u8(a ^ 0x80) x s8(b), minus 128 * column sum of b), converted to fp32, times
//               scale_a[m] * scale_b[n], accumulated in fp32. B is packed once per call into
//               panels [N/16][Kp/4][16][4] bytes (Kp = blocks * round_up(B, 4), zero padded),
//               so any block size works on the vector path.
//
// Threading is the caller's: every kernel takes a [begin, end) range (rows, or output
// columns) and can be called concurrently on disjoint ranges.
//
// ISA: chosen at run time (AVX-512 F/BW/VL/VNNI, AVX2+FMA+F16C, scalar); the environment
// variable LLMCORE_CPU_ISA=scalar|avx2|avx512 forces a lower path (read on each call); the
// AMX prefill GEMM (bfp_cpu_gemm_amx.cpp) runs only when it is unset or "amx".
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/cpu_isa.h"
#include "common/dtype.h"

namespace llmcore {
namespace bfp {
namespace cpu {

// Best ISA this CPU supports, lowered by LLMCORE_CPU_ISA when set (common/cpu_isa.h).
Isa active_isa();

inline int64_t exponent_cols(int64_t k, int block) { return (k + block - 1) / block; }
inline int64_t mantissa_cols(int64_t k, int bits) { return bits <= 4 ? (k + 1) / 2 : k; }

// Quantise rows [row_begin, row_end) of x (row r starts at x + r * x_row_stride elements,
// elements contiguous). mant / exp rows have strides mant_row_stride / exp_row_stride bytes.
void quantize_rows(const void* x, DType xt, int64_t x_row_stride, int64_t k, int bits,
                   int block, bool round_even, uint8_t* mant, int64_t mant_row_stride,
                   uint8_t* exp, int64_t exp_row_stride, int64_t row_begin, int64_t row_end);

// Dequantise rows [row_begin, row_end) into out (out_row_stride elements, of type ot).
void dequantize_rows(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                     int64_t exp_row_stride, int64_t k, int bits, int block, void* out,
                     DType ot, int64_t out_row_stride, int64_t row_begin, int64_t row_end);

// Weight-only linear, output columns [n_begin, n_end):
//   y[m, n] = sum_k x[m, k] * dequant(w)[n, k] (+ bias[n]),  m in [0, M)
// x fp32 [M, K] (row stride ldx), w rows of stride w_row_stride / exp_row_stride bytes,
// bias fp32 [N] or null, y fp32 (row stride ldy). Meant for small M (decode).
void linear_rows(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w_mant,
                 int64_t w_row_stride, const uint8_t* w_exp, int64_t exp_row_stride, int bits,
                 int block, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                 int64_t n_end);

// The same with x of any float type (fp32, bf16, fp16; row stride ldx elements). bf16 x
// may be multiplied in bf16 (vdpbf16ps) against weights dequantised to bf16, which is exact
// (8-bit mantissas fit bf16; bf16 x bf16 products are exact in fp32) where no product is
// near fp32's subnormal range; otherwise, and for other types, x is widened to fp32.
void linear_rows_typed(const void* x, DType xt, int64_t M, int64_t ldx, int64_t K,
                       const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
                       int64_t exp_row_stride, int bits, int block, const float* bias, float* y,
                       int64_t ldy, int64_t n_begin, int64_t n_end);

// ---- BFP x BFP GEMM -----------------------------------------------------------------
// Packed operands. Kp = exponent_cols(k, block) * round_up(block, 4).
struct GemmPlan {
  int64_t M, N, K;
  int a_bits, b_bits, block;
  int64_t nb;      // blocks along K
  int64_t bpad;    // round_up(block, 4)
  int64_t kp;      // nb * bpad
  int64_t n_pad;   // round_up(N, 16)
};
GemmPlan gemm_plan(int64_t M, int64_t N, int64_t K, int a_bits, int b_bits, int block);

// Scratch sizes in bytes (each buffer 64-byte aligned by the caller).
size_t gemm_a_bytes(const GemmPlan& p);       // A mantissas: u8 [M][kp] (a ^ 0x80)
size_t gemm_a_scale_bytes(const GemmPlan& p); // fp32 [M][nb]
size_t gemm_b_bytes(const GemmPlan& p);       // s8 panels [n_pad/16][kp/4][16][4]
size_t gemm_b_aux_bytes(const GemmPlan& p);   // fp32 scales + int32 (-128 * col sums),
                                              // each [n_pad/16][nb][16]

// Pack rows [m_begin, m_end) of A / panels [p_begin, p_end) of B (a panel = 16 rows of b).
void gemm_pack_a(const GemmPlan& p, const uint8_t* a_mant, int64_t a_row_stride,
                 const uint8_t* a_exp, int64_t a_exp_stride, uint8_t* a_pack, float* a_scale,
                 int64_t m_begin, int64_t m_end);
void gemm_pack_b(const GemmPlan& p, const uint8_t* b_mant, int64_t b_row_stride,
                 const uint8_t* b_exp, int64_t b_exp_stride, int8_t* b_pack, float* b_scale,
                 int32_t* b_corr, int64_t p_begin, int64_t p_end);

// C[m, n] for m in [m_begin, m_end), panels [p_begin, p_end) (columns 16*p .. 16*p+15,
// clipped to N); C fp32 row stride ldc; bias fp32 [N] or null.
void gemm_compute(const GemmPlan& p, const uint8_t* a_pack, const float* a_scale,
                  const int8_t* b_pack, const float* b_scale, const int32_t* b_corr,
                  const float* bias, float* c, int64_t ldc, int64_t m_begin, int64_t m_end,
                  int64_t p_begin, int64_t p_end);

// ---- int8-activation GEMV (decode, small M): bfp_cpu_gemv_q8.cpp ------------------------
// y[m, n] = sum_b scale_a[m, b] * scale_w[n, b] * sum_{k in b} a[m, k] * w[n, k] (+ bias[n])
// for activation rows a of 5..8-bit mantissas (int8 storage) and weight rows w of any
// mantissa width, both in blocks of 32 along K. Each block's dot product is exact in int32;
// the weight is read in its storage layout (nothing is packed or cached).
bool gemv_q8_supported(int a_bits, int w_bits, int block);

struct GemvQ8Plan {
  int64_t M, K;
  int w_bits;
  bool tiles;         // the weight is in the GEMV tile layout (below); the AVX-512 tile
                      // kernel reads it with the `cols` activation layout
  bool cols;          // the AVX-512 column-tile layout (M > 1, 4-bit w by default)
  bool tiled;         // the AVX-512 256-byte step layout (M > 1, 8-bit w by default); both
                      // chosen by the ISA in use when planned
  bool row1;          // M == 1 on AVX-512: the single-row kernel on the plain layout
  int64_t row_bytes;  // weight bytes walked per row: mantissa_cols(K, w_bits) (cols), else
                      // rounded up to 256 (tiled) or 64
  int64_t groups;     // int32 / fp32 lanes per row of corr and xs: one per block of 32
                      // (cols), 16 per 256 weight bytes (tiled), else row_bytes / 4
  int64_t xq_cols;    // activation bytes per row: 32 per block (cols), row_bytes (8-bit w)
                      // or 2 * row_bytes (4-bit w)
};
GemvQ8Plan gemv_q8_plan(int64_t M, int64_t K, int w_bits);
// The plan for a weight in the tile layout: `tiles` (and `cols`) on AVX-512 VNNI, any M;
// elsewhere the plain plan (tiles false): the caller unpacks the weight rows first.
GemvQ8Plan gemv_q8_plan_tiles(int64_t M, int64_t K, int w_bits);

// Lay out the activation rows for the weight's bytes (O(M K), once per call; the buffers
// serve any number of weights of the same K and w_bits):
//   cols (AVX-512), per block b of 32 elements (K padded with a = 0):
//   xq   [M][32 * nb] int8 a: 8 groups of 4 bytes per block, the partners of the weight
//        block's 4-byte groups: 8-bit w, elements in order; 4-bit w, group 2j the elements
//        8j + 0, 2, 4, 6 (low nibbles of bytes 4j..4j+3), group 2j + 1 the odd ones
//   corr int32 [M][nb]: -(w offset) * (sum of the block's a): -8 (4-bit), -128 (8-bit)
//   xs   fp32 [M][nb]: the scale of the activation block
//   tiled (AVX-512), per step of 256 weight bytes s and lane L = 4k + c (k, c < 4), which
//   covers the weight bytes 256 s + 64 c + 16 k + [0, 16) (4-bit: one block; 8-bit: half):
//   xq   [M][xq_cols] int8 a, 0 past K: per step, for j < 4, the lanes' partners of weight
//        bytes 4j..4j+3 of each lane (64 bytes; 4-bit: those of the low nibbles, then of
//        the high ones)
//   corr int32 [M][groups]: the lane's -(w offset) * (sum of its a): -8 (4-bit), -128
//   xs   fp32 [M][groups]: the scale of the lane's activation block, 0 past K
//   otherwise (AVX2, scalar):
//   xq   [M][xq_cols] bytes: 8-bit w: a + 128 in order, 128 (a = 0) past K; packed w:
//        int8 a, per 64 weight bytes (128 elements) the 64 even elements, then the 64 odd
//        ones (the low / high nibbles' partners), 0 past K
//   corr int32 [M][groups]: for row1 (AVX-512, M = 1) and 4-bit w, -8 * (sum of the 8 a of
//        each 4-byte group); otherwise unused
//   xs   fp32 [M][groups]: xs[m][b] = scale of block b of row m for b < ceil(K / 32), 0 after
void gemv_q8_prepare(const GemvQ8Plan& p, const int8_t* a_mant, int64_t a_row_stride,
                     const uint8_t* a_exp, int64_t a_exp_stride, int a_bits, int8_t* xq,
                     int32_t* corr, float* xs);

// Output columns [n_begin, n_end) for every m in [0, M); y fp32 row stride ldy.
void gemv_q8(const GemvQ8Plan& p, const int8_t* xq, const int32_t* corr, const float* xs,
             const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
             int64_t w_exp_stride, const float* bias, float* y, int64_t ldy, int64_t n_begin,
             int64_t n_end);

// ---- the GEMV tile layout: bfp_cpu_gemv_q8.cpp -------------------------------------------
// A weight [N, K] in blocks of 32 with N % 16 == 0 and K % 32 == 0 can be stored as tiles of
// 16 rows: per tile t and block b, the 16 rows' block bytes (32 for int8 mantissas, 16 for
// packed nibbles) in 4-byte groups, group-major, so that one 64-byte vector holds group g of
// all 16 rows (lane c = row 16 t + c):
//   tmant[((t * nb + b) * G + g) * 64 + 4 c + i] = mant[16 t + c][bb * b + 4 g + i]
//   texp [(t * nb + b) * 16 + c]                 = exp [16 t + c][b]
// (bb = block bytes, G = bb / 4, nb = K / 32). The same bytes, reordered: the decode GEMV
// then reads one sequential stream and needs no transposes (gemv_q8_tiles).
bool tiles_supported(int64_t N, int64_t K, int bits, int block);
inline int64_t tile_block_bytes(int bits) { return bits <= 4 ? 16 : 32; }
// Tiles [t_begin, t_end) from the plain layout (row strides in bytes), and back.
void tiles_pack(const uint8_t* mant, int64_t mant_stride, const uint8_t* exp, int64_t exp_stride,
                int64_t K, int bits, uint8_t* tmant, uint8_t* texp, int64_t t_begin,
                int64_t t_end);
void tiles_unpack(const uint8_t* tmant, const uint8_t* texp, int64_t K, int bits, uint8_t* mant,
                  int64_t mant_stride, uint8_t* exp, int64_t exp_stride, int64_t t_begin,
                  int64_t t_end);

// Row `row` of a tiled weight in the plain layout: mant (mantissa_cols(K, bits) bytes) and
// exp (K / 32 bytes); an embedding lookup from a table shared with a tiled head.
void tiles_row(const uint8_t* tmant, const uint8_t* texp, int64_t K, int bits, int64_t row,
               uint8_t* mant, uint8_t* exp);

// gemv_q8 for a weight in the tile layout, planned with gemv_q8_plan_tiles (p.tiles true):
// output columns [n_begin, n_end), multiples of 16.
void gemv_q8_tiles(const GemvQ8Plan& p, const int8_t* xq, const int32_t* corr, const float* xs,
                   const uint8_t* tmant, const uint8_t* texp, const float* bias, float* y,
                   int64_t ldy, int64_t n_begin, int64_t n_end);

// ---- int8-activation GEMM on AMX tiles (prefill, M > 16): bfp_cpu_gemm_amx.cpp ----------
// The same sums as gemv_q8 for many rows. The weight is read in its storage layout (4-bit
// rows unpacked per 16-row panel into scratch); only the activation is laid out per call.
// True when this CPU has AMX-INT8, the OS granted the tile state, LLMCORE_CPU_ISA is unset
// (or "amx"), the activation has 5..8-bit mantissas, and the block is 32.
bool gemm_amx_supported(int a_bits, int w_bits, int block);

struct GemmAmxPlan {
  int64_t M, N, K;
  int w_bits;
  int64_t nb;       // blocks of 32 along K
  int64_t m_tiles;  // ceil(M / 16)
};
GemmAmxPlan gemm_amx_plan(int64_t M, int64_t N, int64_t K, int w_bits);
size_t gemm_amx_a_bytes(const GemmAmxPlan& p);        // int8 [m_tiles][nb][8][16][4]
size_t gemm_amx_a_scale_bytes(const GemmAmxPlan& p);  // fp32 [m_tiles][nb][16]

// Activation row tiles [t_begin, t_end) (16 rows each, zero padded) as the B operand.
void gemm_amx_prepare(const GemmAmxPlan& p, const int8_t* a_mant, int64_t a_row_stride,
                      const uint8_t* a_exp, int64_t a_exp_stride, int a_bits, int8_t* a_tiles,
                      float* a_scales, int64_t t_begin, int64_t t_end);

// Output columns [n_begin, n_end) for every m; y fp32 row stride ldy.
void gemm_amx(const GemmAmxPlan& p, const int8_t* a_tiles, const float* a_scales,
              const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
              int64_t w_exp_stride, const float* bias, float* y, int64_t ldy, int64_t n_begin,
              int64_t n_end);

// The same product for a weight in the GEMV tile layout (above): there a block of 16 rows
// is AMX's B operand as stored (8 rows of 64 bytes: 4-byte groups of 16 columns; nibbles
// are widened per 16-row tile), and the activation rows are the A operand, 16 x 32 bytes
// per block: int8 [m_tiles * 16][32 nb], zero rows past M (4-bit weights: each block's
// elements even, then odd, as for gemm_amx_prepare), and their scales as gemm_amx_prepare
// writes them. Output columns [n_begin, n_end), multiples of 16.
size_t gemm_amx_rows_bytes(const GemmAmxPlan& p);
void gemm_amx_prepare_rows(const GemmAmxPlan& p, const int8_t* a_mant, int64_t a_row_stride,
                           const uint8_t* a_exp, int64_t a_exp_stride, int a_bits,
                           int8_t* a_rows, float* a_scales, int64_t t_begin, int64_t t_end);
void gemm_amx_tiles(const GemmAmxPlan& p, const int8_t* a_rows, const float* a_scales,
                    const uint8_t* tmant, const uint8_t* texp, const float* bias, float* y,
                    int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
