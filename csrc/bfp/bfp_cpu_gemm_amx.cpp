// int8-activation GEMM on AMX-INT8 tiles (prefill, M > 16): 8-bit activation mantissas in
// blocks of 32 against BFP weights (MXINT8, MXINT4, any 2..8-bit mantissa, block 32).
//
//   y[m, n] = sum_b sa[m, b] sw[n, b] sum_{k in b} a[m, k] w[n, k]   (+ bias[n])
//
// Shapes: a int8 [M, K] (+ exponent bytes [M, nb]), w [N, K] int8 or [N, ceil(K/2)] packed
// nibbles (+ exponent bytes [N, nb]), nb = ceil(K / 32), y fp32 [M, N].
//
// Algorithm. A weight tile is 16 weight rows x one block (32 bytes): for 8-bit weights it
// is loaded straight from storage (tileloadd with the row stride; nothing is packed or
// cached); 4-bit rows are unpacked per 16-row panel into a 16 x K int8 scratch (L1/L2),
// the low nibbles of a block first, then the high ones. The activation is laid out once per
// call as the B operand, 16 rows x one block per tile ([8][16][4] bytes; for 4-bit weights
// each block's elements in the order even, odd, matching the unpacked weight), with its
// block scales [m-tile][block][16]. Per (16 x 16 output tile, block): tdpbssd gives the
// exact int32 block products C[n][m], which are stored (1 KiB, L1), converted to fp32,
// multiplied by sa[m, b] (a vector) and by sw[n, b] (a broadcast), and accumulated in 16
// fp32 registers, one per weight row. Four result tiles take turns, and a block's int32
// tile is read back three blocks after its store, so the tile unit and the vector units
// overlap. Powers of two scale exactly unless the product leaves fp32's normal range; a
// NaN block scale (exponent byte 255) makes its outputs NaN.
//
// Cost: the per-block store and fp32 scaling (3 vector ops per 16 outputs per block) bound
// it, not tdpbssd; measured in benchmarks/results/cpu-intel-xeon/prefill_gemm.json.
//
// Compiled with target pragmas (no -m flags), so the library loads anywhere; the binding
// calls it only when gemm_amx_supported() (CPU flags, and the kernel granted the tile data
// state via arch_prctl(ARCH_REQ_XCOMP_PERM)). Threading is the caller's ([n_begin, n_end)
// column ranges, multiples of 16 but the last).
#include "bfp/bfp_cpu_internal.h"

#include <stdlib.h>
#include <string.h>

#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LLMCORE_AMX 1
#endif

namespace llmcore {
namespace bfp {
namespace cpu {

GemmAmxPlan gemm_amx_plan(int64_t M, int64_t N, int64_t K, int w_bits) {
  GemmAmxPlan p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.w_bits = w_bits;
  p.nb = (K + 31) / 32;
  p.m_tiles = (M + 15) / 16;
  return p;
}

size_t gemm_amx_a_bytes(const GemmAmxPlan& p) {
  return static_cast<size_t>(p.m_tiles * p.nb) * 512;
}
size_t gemm_amx_a_scale_bytes(const GemmAmxPlan& p) {
  return static_cast<size_t>(p.m_tiles * p.nb) * 16 * 4;
}

// Position inside a block's 32 bytes of the element i (0..31) of that block.
static inline int tile_pos(int i, bool packed) {
  return packed ? (i & 1) * 16 + (i >> 1) : i;
}

void gemm_amx_prepare(const GemmAmxPlan& p, const int8_t* a_mant, int64_t a_row_stride,
                      const uint8_t* a_exp, int64_t a_exp_stride, int a_bits, int8_t* a_tiles,
                      float* a_scales, int64_t t_begin, int64_t t_end) {
  const bool packed = is_packed(p.w_bits);
  for (int64_t t = t_begin; t < t_end; ++t) {
    int8_t* tiles = a_tiles + t * p.nb * 512;
    float* scales = a_scales + t * p.nb * 16;
    memset(tiles, 0, static_cast<size_t>(p.nb) * 512);
    for (int64_t b = 0; b < p.nb; ++b)
      for (int r = 0; r < 16; ++r) scales[b * 16 + r] = 0.0f;
    for (int r = 0; r < 16; ++r) {
      const int64_t m = t * 16 + r;
      if (m >= p.M) break;
      const int8_t* src = a_mant + m * a_row_stride;
      for (int64_t b = 0; b < p.nb; ++b) {
        int8_t* tile = tiles + b * 512;
        const int64_t i0 = b * 32;
        const int n = static_cast<int>(p.K - i0 < 32 ? p.K - i0 : 32);
        for (int i = 0; i < n; ++i) {
          const int pos = tile_pos(i, packed);
          tile[(pos >> 2) * 64 + r * 4 + (pos & 3)] = src[i0 + i];
        }
        scales[b * 16 + r] = block_scale(a_exp[m * a_exp_stride + b], a_bits);
      }
    }
  }
}

size_t gemm_amx_rows_bytes(const GemmAmxPlan& p) {
  return static_cast<size_t>(p.m_tiles * 16 * p.nb) * 32;
}

void gemm_amx_prepare_rows(const GemmAmxPlan& p, const int8_t* a_mant, int64_t a_row_stride,
                           const uint8_t* a_exp, int64_t a_exp_stride, int a_bits,
                           int8_t* a_rows, float* a_scales, int64_t t_begin, int64_t t_end) {
  const bool packed = is_packed(p.w_bits);
  const int64_t lda = 32 * p.nb;
  for (int64_t t = t_begin; t < t_end; ++t) {
    float* scales = a_scales + t * p.nb * 16;
    for (int r = 0; r < 16; ++r) {
      const int64_t m = t * 16 + r;
      int8_t* dst = a_rows + m * lda;
      if (m >= p.M) {
        memset(dst, 0, static_cast<size_t>(lda));
        for (int64_t b = 0; b < p.nb; ++b) scales[b * 16 + r] = 0.0f;
        continue;
      }
      const int8_t* src = a_mant + m * a_row_stride;
      for (int64_t b = 0; b < p.nb; ++b) {
        if (packed)
          for (int i = 0; i < 32; ++i) dst[b * 32 + tile_pos(i, true)] = src[b * 32 + i];
        else
          memcpy(dst + b * 32, src + b * 32, 32);
        scales[b * 16 + r] = block_scale(a_exp[m * a_exp_stride + b], a_bits);
      }
    }
  }
}

#if defined(LLMCORE_AMX)
namespace {

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

bool request_tiles() {
  const CpuFeatures& f = cpu_features();
  __builtin_cpu_init();
  if (!(f.avx512f && f.avx512bw && f.avx512vl)) return false;
  // __builtin_cpu_supports knows amx-int8 only from GCC 13: read CPUID leaf 7 (EDX bits 24
  // AMX-TILE, 25 AMX-INT8) directly.
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  if (!((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0, tmm1: weight tiles (16 rows x 32 bytes); tmm2, tmm3: activation tiles (8 rows x 64
// bytes); tmm4..7: int32 results (16 x 16).
void load_config() {
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t : {0, 1}) { cfg.rows[t] = 16; cfg.colsb[t] = 32; }
  for (int t : {2, 3}) { cfg.rows[t] = 8; cfg.colsb[t] = 64; }
  for (int t : {4, 5, 6, 7}) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  // GCC 12 does not see ldtilecfg read the whole struct: out of line, it dropped the rows /
  // colsb stores above (the config then had no tiles and the first tile op raised SIGILL).
  // The barrier makes every store land first.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}


// The block loop of both AMX kernels, a macro because the tile intrinsics take literal tile
// numbers. Block b's int32 products go to result tile 4 + (b & 3), from operand tiles 0 / 2
// or 1 / 3 in turn: ISSUE(A, B, C, b) (a macro) loads and multiplies, and the result is
// stored to ci[b & 7]. Four blocks are in flight: a block's tdpbssd -> tilestored chain is
// long, so SCALE(b) reads block b back only kLag blocks later, when its stores have long
// reached L1 (reading at once would wait for the whole chain every block).
#define LLMCORE_AMX_BLOCKS(nb, ci, ISSUE, SCALE)                                  \
  do {                                                                            \
    constexpr int64_t kLag = 3;                                                   \
    for (int64_t b = 0; b < (nb); ++b) {                                          \
      int32_t* dst = (ci)[b & 7];                                                 \
      switch (b & 3) {                                                            \
        case 0: ISSUE(0, 2, 4, b) _tile_stored(4, dst, 64); break;                \
        case 1: ISSUE(1, 3, 5, b) _tile_stored(5, dst, 64); break;                \
        case 2: ISSUE(0, 2, 6, b) _tile_stored(6, dst, 64); break;                \
        default: ISSUE(1, 3, 7, b) _tile_stored(7, dst, 64); break;               \
      }                                                                           \
      if (b >= kLag) SCALE(b - kLag);                                             \
    }                                                                             \
    for (int64_t b = (nb) > kLag ? (nb) - kLag : 0; b < (nb); ++b) SCALE(b);      \
  } while (0)

// 16 rows of 4-bit weights, every block, unpacked to int8 [nb][16][32] (low nibbles of the
// block's 16 bytes, then the high nibbles); rows >= rows_valid and bytes past the row are 0.
void unpack_panel(const GemmAmxPlan& p, const uint8_t* w, int64_t stride, int rows_valid,
                  int8_t* out) {
  const int64_t bytes = mantissa_cols(p.K, p.w_bits);
  const __m128i lo_mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
  for (int r = 0; r < 16; ++r) {
    const uint8_t* row = w + r * stride;
    for (int64_t b = 0; b < p.nb; ++b) {
      int8_t* dst = out + (b * 16 + r) * 32;
      if (r >= rows_valid) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_setzero_si256());
        continue;
      }
      const int64_t left = bytes - b * 16;
      const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      const __m128i v = _mm_maskz_loadu_epi8(m, row + b * 16);
      // Sign-extend a nibble: (x ^ 8) - 8.
      const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(v, lo_mask), eight), eight);
      const __m128i hi = _mm_sub_epi8(
          _mm_xor_si128(_mm_and_si128(_mm_srli_epi16(v, 4), lo_mask), eight), eight);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), lo);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), hi);
    }
  }
}

// 16 rows of 8-bit weights into [nb][16][32] with zero padding (a partial panel or block).
void copy_panel(const GemmAmxPlan& p, const uint8_t* w, int64_t stride, int rows_valid,
                int8_t* out) {
  for (int r = 0; r < 16; ++r) {
    const uint8_t* row = w + r * stride;
    for (int64_t b = 0; b < p.nb; ++b) {
      int8_t* dst = out + (b * 16 + r) * 32;
      const int64_t left = r < rows_valid ? p.K - b * 32 : 0;
      const __mmask32 m = left >= 32 ? 0xffffffffu
                                     : static_cast<__mmask32>((uint64_t{1} << left) - 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                          _mm256_maskz_loadu_epi8(m, row + b * 32));
    }
  }
}

// Scales for 16 weight rows: sw[b][r] (0 for rows past N).
void weight_scales(const GemmAmxPlan& p, const uint8_t* e, int64_t stride, int rows_valid,
                   float* sw) {
  for (int64_t b = 0; b < p.nb; ++b)
    for (int r = 0; r < 16; ++r)
      sw[b * 16 + r] = r < rows_valid ? block_scale(e[r * stride + b], p.w_bits) : 0.0f;
}

// acc[r] += float(ci[r]) * sa * sw[r] for the 16 rows of one block's int32 tile.
inline void scale_block(const int32_t* ci, const float* sa, const float* sw, __m512 acc[16]) {
  const __m512 s = _mm512_loadu_ps(sa);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ci + r * 16)), s);
    acc[r] = _mm512_fmadd_ps(v, _mm512_set1_ps(sw[r]), acc[r]);
  }
}

void gemm_amx_impl(const GemmAmxPlan& p, const int8_t* a_tiles, const float* a_scales,
                   const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
                   int64_t w_exp_stride, const float* bias, float* y, int64_t ldy,
                   int64_t n_begin, int64_t n_end) {
  load_config();
  const int64_t nb = p.nb;
  const bool packed = is_packed(p.w_bits);
  std::vector<int8_t> panel;
  std::vector<float> sw(static_cast<size_t>(nb) * 16);
  alignas(64) int32_t ci[8][256];
  alignas(64) float out[256];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int rows = static_cast<int>(n_end - n0 < 16 ? n_end - n0 : 16);
    const uint8_t* w = w_mant + n0 * w_row_stride;
    weight_scales(p, w_exp + n0 * w_exp_stride, w_exp_stride, rows, sw.data());
    // Weight tile of block b: straight from storage when whole, else from the panel.
    const bool direct = !packed && rows == 16 && p.K % 32 == 0;
    const int8_t* wt;
    int64_t wt_stride, wt_step;
    if (direct) {
      wt = reinterpret_cast<const int8_t*>(w);
      wt_stride = w_row_stride;
      wt_step = 32;
    } else {
      panel.resize(static_cast<size_t>(nb) * 512);
      if (packed) unpack_panel(p, w, w_row_stride, rows, panel.data());
      else copy_panel(p, w, w_row_stride, rows, panel.data());
      wt = panel.data();
      wt_stride = 32;
      wt_step = 512;
    }
    for (int64_t t = 0; t < p.m_tiles; ++t) {
      const int8_t* at = a_tiles + t * nb * 512;
      const float* sa = a_scales + t * nb * 16;
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      // Weight tile (16 rows x 32 bytes) times activation tile (8 x 64), C[n][m].
#define LLMCORE_AMX_ISSUE(TW, TA, TC, b)          \
  _tile_zero(TC);                                 \
  _tile_loadd(TW, wt + (b) * wt_step, wt_stride); \
  _tile_loadd(TA, at + (b) * 512, 64);            \
  _tile_dpbssd(TC, TW, TA);
      auto scale = [&](int64_t b) { scale_block(ci[b & 7], sa + b * 16, sw.data() + b * 16, acc); };
      LLMCORE_AMX_BLOCKS(nb, ci, LLMCORE_AMX_ISSUE, scale);
#undef LLMCORE_AMX_ISSUE
      // acc[r] holds output column n0 + r for the tile's 16 rows m: write it transposed.
      for (int r = 0; r < 16; ++r) _mm512_store_ps(out + r * 16, acc[r]);
      const int m_valid = static_cast<int>(p.M - t * 16 < 16 ? p.M - t * 16 : 16);
      for (int i = 0; i < m_valid; ++i) {
        float* yr = y + (t * 16 + i) * ldy + n0;
        for (int r = 0; r < rows; ++r) yr[r] = bias ? out[r * 16 + i] + bias[n0 + r] : out[r * 16 + i];
      }
    }
  }
  _tile_release();
}

// One 16-row tile of 4-bit weights in the tile layout, every block, as AMX B tiles
// [nb][8][64] int8: rows 0-3 the low nibbles of groups 0-3, rows 4-7 the high nibbles (the
// block's even elements, then the odd ones: tile_pos), sign-extended.
void widen_tile(int64_t nb, const uint8_t* tw, int8_t* out) {
  const __m512i lo = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
  for (int64_t b = 0; b < nb; ++b)
    for (int g = 0; g < 4; ++g) {
      const __m512i v = _mm512_loadu_si512(tw + (b * 4 + g) * 64);
      const __m512i l = _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(v, lo), eight), eight);
      const __m512i h = _mm512_sub_epi8(
          _mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), lo), eight), eight);
      _mm512_storeu_si512(out + b * 512 + g * 64, l);
      _mm512_storeu_si512(out + b * 512 + (4 + g) * 64, h);
    }
}

// acc[r] += float(ci[r]) * sa[r] * sw (16 output columns in lanes) for 16 activation rows.
inline void scale_rows(const int32_t* ci, const float* sa, __m512 sw, __m512 acc[16]) {
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(ci + r * 16));
    acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(sw, _mm512_set1_ps(sa[r])), acc[r]);
  }
}

void gemm_amx_tiles_impl(const GemmAmxPlan& p, const int8_t* a_rows, const float* a_scales,
                         const uint8_t* tmant, const uint8_t* texp, const float* bias, float* y,
                         int64_t ldy, int64_t n_begin, int64_t n_end) {
  load_config();
  const int64_t nb = p.nb, lda = 32 * nb;
  const bool packed = is_packed(p.w_bits);
  const int64_t tile_bytes = 16 * nb * (packed ? 16 : 32);
  std::vector<int8_t> wide;
  std::vector<float> sw(static_cast<size_t>(nb) * 16);
  alignas(64) int32_t ci[8][256];
  const __m512i ebias = _mm512_set1_epi32(kExpBias + p.w_bits - 2);
  const __m512i nan_e = _mm512_set1_epi32(kNaNExponent);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const uint8_t* tw = tmant + (n0 / 16) * tile_bytes;
    const uint8_t* te = texp + (n0 / 16) * nb * 16;
    for (int64_t b = 0; b < nb; ++b) {  // the 16 columns' block scales
      const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(te + 16 * b)));
      const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(1.0f),
                                        _mm512_cvtepi32_ps(_mm512_sub_epi32(e, ebias)));
      _mm512_storeu_ps(sw.data() + 16 * b, _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(e, nan_e), s,
                                                               _mm512_set1_ps(__builtin_nanf(""))));
    }
    const int8_t* wt = reinterpret_cast<const int8_t*>(tw);
    if (packed) {
      wide.resize(static_cast<size_t>(nb) * 512);
      widen_tile(nb, tw, wide.data());
      wt = wide.data();
    }
    const __m512 bv = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    for (int64_t t = 0; t < p.m_tiles; ++t) {
      const int8_t* at = a_rows + t * 16 * lda;
      const float* sa = a_scales + t * nb * 16;
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      // Activation tile (16 rows x 32 bytes) times weight tile (8 x 64, as stored), C[m][n].
#define LLMCORE_AMX_ISSUE(TA, TW, TC, b)  \
  _tile_zero(TC);                         \
  _tile_loadd(TA, at + (b) * 32, lda);    \
  _tile_loadd(TW, wt + (b) * 512, 64);    \
  _tile_dpbssd(TC, TA, TW);
      auto scale = [&](int64_t b) {
        scale_rows(ci[b & 7], sa + b * 16, _mm512_loadu_ps(sw.data() + b * 16), acc);
      };
      LLMCORE_AMX_BLOCKS(nb, ci, LLMCORE_AMX_ISSUE, scale);
#undef LLMCORE_AMX_ISSUE
      const int m_valid = static_cast<int>(p.M - t * 16 < 16 ? p.M - t * 16 : 16);
      for (int r = 0; r < m_valid; ++r)
        _mm512_storeu_ps(y + (t * 16 + r) * ldy + n0, _mm512_add_ps(acc[r], bv));
    }
  }
  _tile_release();
}

#undef LLMCORE_AMX_BLOCKS
#pragma GCC diagnostic pop
#pragma GCC pop_options

}  // namespace

void gemm_amx_tiles(const GemmAmxPlan& p, const int8_t* a_rows, const float* a_scales,
                    const uint8_t* tmant, const uint8_t* texp, const float* bias, float* y,
                    int64_t ldy, int64_t n_begin, int64_t n_end) {
  gemm_amx_tiles_impl(p, a_rows, a_scales, tmant, texp, bias, y, ldy, n_begin, n_end);
}

bool gemm_amx_supported(int a_bits, int w_bits, int block) {
  static const bool granted = request_tiles();
  if (!granted || block != 32 || a_bits < 5 || a_bits > 8 || w_bits < 2 || w_bits > 8)
    return false;
  // LLMCORE_CPU_ISA lowers the ceiling: any value but "amx" turns the tiles off.
  const char* env = getenv("LLMCORE_CPU_ISA");
  return !(env && *env && strcmp(env, "amx") != 0);
}

void gemm_amx(const GemmAmxPlan& p, const int8_t* a_tiles, const float* a_scales,
              const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
              int64_t w_exp_stride, const float* bias, float* y, int64_t ldy, int64_t n_begin,
              int64_t n_end) {
  gemm_amx_impl(p, a_tiles, a_scales, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy,
                n_begin, n_end);
}

#else  // no AMX on this target

bool gemm_amx_supported(int, int, int) { return false; }

void gemm_amx(const GemmAmxPlan&, const int8_t*, const float*, const uint8_t*, int64_t,
              const uint8_t*, int64_t, const float*, float*, int64_t, int64_t, int64_t) {}

void gemm_amx_tiles(const GemmAmxPlan&, const int8_t*, const float*, const uint8_t*,
                    const uint8_t*, const float*, float*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
