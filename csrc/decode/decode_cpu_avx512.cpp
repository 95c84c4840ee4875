// AVX-512 (F/BW/VL) decode task: 16 fp32 lanes per vector. Compiled with a target pragma,
// not -march, so the library still loads on any x86-64; decode_cpu.cpp only calls in here
// after __builtin_cpu_supports said yes.
//
// A task (one sequence, one kv head, one split) walks its positions in blocks of 128 keys
// (8 tiles of 16 cache rows), two passes over each block:
//   pass 1, per tile: where the rows are (an empty row, past the split or on an invalid
//            page, is a zero row), a prefetch of the tile after next, and every query
//            row's 16 scores into the block's score rows.
//   K/V      up to 8 query rows (decode, and verification without GQA): each 16-element
//            chunk of a row is read straight from the cache and widened in registers
//            (fp32 as is; bf16: vpmovzxwd + shift; fp16: vcvtph2ps; MXINT8: vpmovsxbd,
//            vcvtdq2ps, times the block scale 2^(e-133) of its 32-element block), never
//            stored; more rows: each valid row is widened once into an fp32 tile, padded
//            to D16 = 16 * ceil(D/16) with zeros, that all rows share. Both give the same
//            values.
//   scores   blocks of 4 query rows (the last one 1-6) x 4-16 keys (16-24 accumulators), then a
//            shuffle tree turns each row's accumulators into one vector of the 16 scores of
//            the tile (no per-score horizontal sums). Every score is the same sum in the
//            same order whatever the blocking, so a row's result does not depend on R.
//   softmax  per query row, once per block: causal + validity mask, the block's max (one
//            reduction), the fp32 accumulator row rescaled only when the running max m
//            grows, p = exp(s - m) (vector exp, range reduction + degree-6 polynomial +
//            vscalefps, about 2 ulp) and their sum (one reduction) into l. The block
//            boundaries are fixed positions of the task, so a row's bits do not depend on
//            R either.
//   pass 2, per tile, P.V: blocks of 8 query rows (the last one 4-8), two chunks of the
//            accumulators at a time: each V vector feeds their FMAs, p broadcast inside
//            the FMA; 1-3 rows go one at a time, each holding up to 8 chunks of its
//            accumulator and walking the keys.
#include "decode/decode_cpu_internal.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include <vector>

#include "common/exp_avx512.h"
#include "common/half_convert.h"
#include "bfp/bfp_rule.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// GCC 12's intrinsic headers fill don't-care lanes from _mm512_undefined_*(), a
// self-initialised variable that -Wuninitialized reports at every use; not our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace llmcore {
namespace decode {
namespace cpu {
namespace {

constexpr int kTile = 16;
constexpr int64_t kPrefetchRows = 2 * kTile;  // prefetch distance
// Keys per softmax block: a task's positions from its first, in blocks of this many (the
// boundaries do not depend on the query rows, so neither do a row's bits).
constexpr int64_t kBlock = 8 * kTile;

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

inline __m512 exp16(__m512 x) { return exp_avx512(x); }  // common/exp_avx512.h

// 16 elements at element offset `off` of a cache row, widened to fp32 (MXINT8: unscaled).
template <DType T>
inline __m512 load16(const void* base, int64_t off, __mmask16 m) {
  if constexpr (T == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + off);
  } else if constexpr (T == kMxint8) {
    const __m128i b = _mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(base) + off);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + off);
    if constexpr (T == DType::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// 4 accumulators (keys) of one query row -> per 128-bit lane, the 4 keys' partial sums.
inline __m512 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
  return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

// Four reduce4 results (keys 0-3, 4-7, 8-11, 12-15) -> the 16 scores, lane i = key i.
inline __m512 combine4(__m512 u0, __m512 u1, __m512 u2, __m512 u3) {
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x44),
                                  _mm512_shuffle_f32x4(u0, u1, 0xEE));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x44),
                                  _mm512_shuffle_f32x4(u2, u3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

// The tile's K/V rows as fp32 vectors: ld(i, c) is elements [16c, 16c + 16) of row i.
// F32Rows reads rows already in fp32 (a widened tile); CacheRows<T> reads the cache rows
// where they are and widens (MXINT8: and scales) in registers, giving the very values
// widen_row stores from it, padding lanes zero. An empty row points at zeros.
struct F32Rows {
  const float* const* p;
  __m512 operator()(int64_t i, int64_t c) const { return _mm512_loadu_ps(p[i] + 16 * c); }
};

template <DType T>
struct CacheRows {
  const void* const* p;      // row starts
  const uint8_t* const* e;   // MXINT8: the row's block exponents
  const __mmask16* mask;     // per 16-element chunk: the lanes inside head_dim
  __m512 operator()(int64_t i, int64_t c) const {
    __m512 x = load16<T>(p[i], 16 * c, mask[c]);
    if constexpr (T == kMxint8)
      x = _mm512_mul_ps(x, _mm512_set1_ps(bfp::block_scale(e[i][(16 * c) / kMxBlock], kMxBits)));
    return x;
  }
};

// Row i of a tile, widened by `ld` (CacheRows<T>: the very values the direct path reads),
// into fp32 dst[0 .. nd * 16) (zero padded).
template <class Ld>
inline void widen_row(const Ld& ld, int64_t i, int64_t nd, float* dst) {
  for (int64_t c = 0; c < nd; ++c) _mm512_storeu_ps(dst + 16 * c, ld(i, c));
}

// S[rr * ss + i] = q[rr] . k[i] for RB query rows (stride d16) and the tile's 16 rows, keys
// taken KG at a time (RB * KG accumulators). Every score is the same sum in the same order
// whatever RB and KG are (an FMA chain over the chunks, then a fixed lane tree), so a
// query row's scores do not depend on how many rows share its task.
template <int RB, int KG, class Ld>
inline void scores(const float* q, int64_t d16, const Ld& ld, int64_t n, float* S,
                   int64_t ss) {
  static_assert(KG % 4 == 0 && 16 % KG == 0 && RB * KG <= 24, "register blocking");
  const int64_t nd = d16 / 16;
  __m512 u[RB][4];
  for (int g = 0; g < 16 / KG; ++g) {
    const int k0 = g * KG;
    if (k0 >= n) {
      for (int rr = 0; rr < RB; ++rr)
        for (int x = 0; x < KG / 4; ++x) u[rr][k0 / 4 + x] = _mm512_setzero_ps();
      continue;
    }
    __m512 acc[RB][KG];
    for (int rr = 0; rr < RB; ++rr)
      for (int x = 0; x < KG; ++x) acc[rr][x] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nd; ++c) {
      __m512 kv[KG];
      for (int x = 0; x < KG; ++x) kv[x] = ld(k0 + x, c);
      for (int rr = 0; rr < RB; ++rr) {
        const __m512 qv = _mm512_loadu_ps(q + rr * d16 + 16 * c);
        for (int x = 0; x < KG; ++x) acc[rr][x] = _mm512_fmadd_ps(qv, kv[x], acc[rr][x]);
      }
    }
    for (int rr = 0; rr < RB; ++rr)
      for (int x = 0; x < KG / 4; ++x)
        u[rr][k0 / 4 + x] = reduce4(acc[rr][4 * x], acc[rr][4 * x + 1], acc[rr][4 * x + 2],
                                    acc[rr][4 * x + 3]);
  }
  for (int rr = 0; rr < RB; ++rr)
    _mm512_storeu_ps(S + ss * rr, combine4(u[rr][0], u[rr][1], u[rr][2], u[rr][3]));
}

// o = fma(p, v, o) for one accumulator, or (Skip) only where p != 0, so a key hidden from a
// row (a later new token) never brings its NaN into that row (0 * NaN is NaN).
template <bool Skip>
inline __m512 fma_p(__m512 p, __m512 v, __m512 o) {
  if constexpr (Skip)
    return _mm512_mask3_fmadd_ps(p, v, o, _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_NEQ_UQ));
  return _mm512_fmadd_ps(p, v, o);
}

// o + p * v with p = *x broadcast from memory inside the FMA ({1to16}): GCC otherwise
// broadcasts into a register first, one more instruction per (row, key).
inline __m512 fma_bcast(__m512 o, __m512 v, const float* x) {
  __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(o) : "v"(v), "m"(*x));
  return o;
}

// O[rr] += sum_i P[rr * ps + i] * v[i] for RB query rows (stride d16), tile rows i < n, in
// key order per accumulator: two chunks at a time, each V chunk feeding RB accumulators and
// each p (broadcast inside the FMA; with Skip, masked where it is 0) both. Two chunks give 5
// query rows (a verification of 4 drafts) 10 independent FMA chains; one chunk's 5 chains
// waited on the FMA latency (4 cycles a key).
template <int RB, bool Skip, class Ld>
inline void accumulate_pv(const float* P, int64_t ps, const Ld& ld, int64_t n, float* O,
                          int64_t d16) {
  const int64_t nd = d16 / 16;
  int64_t c = 0;
  for (; c + 2 <= nd; c += 2) {  // two chunks: separate arrays, which GCC keeps in registers
    __m512 o0[RB], o1[RB];
    for (int rr = 0; rr < RB; ++rr) {
      o0[rr] = _mm512_loadu_ps(O + rr * d16 + 16 * c);
      o1[rr] = _mm512_loadu_ps(O + rr * d16 + 16 * c + 16);
    }
    for (int64_t i = 0; i < n; ++i) {
      const __m512 v0 = ld(i, c), v1 = ld(i, c + 1);
      for (int rr = 0; rr < RB; ++rr) {
        if constexpr (Skip) {  // (the compiler shares the p != 0 mask of the two)
          const __m512 p = _mm512_set1_ps(P[ps * rr + i]);
          o0[rr] = fma_p<true>(p, v0, o0[rr]);
          o1[rr] = fma_p<true>(p, v1, o1[rr]);
        } else {
          o0[rr] = fma_bcast(o0[rr], v0, P + ps * rr + i);
          o1[rr] = fma_bcast(o1[rr], v1, P + ps * rr + i);
        }
      }
    }
    for (int rr = 0; rr < RB; ++rr) {
      _mm512_storeu_ps(O + rr * d16 + 16 * c, o0[rr]);
      _mm512_storeu_ps(O + rr * d16 + 16 * c + 16, o1[rr]);
    }
  }
  for (; c < nd; ++c) {
    __m512 o[RB];
    for (int rr = 0; rr < RB; ++rr) o[rr] = _mm512_loadu_ps(O + rr * d16 + 16 * c);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 v = ld(i, c);
      for (int rr = 0; rr < RB; ++rr)
        o[rr] = fma_p<Skip>(_mm512_set1_ps(P[ps * rr + i]), v, o[rr]);
    }
    for (int rr = 0; rr < RB; ++rr) _mm512_storeu_ps(O + rr * d16 + 16 * c, o[rr]);
  }
}

// The same sums for one query row with CB chunks [c0, c0 + CB) held at once: keys outer,
// so the CB accumulators are independent chains (one row has no other rows to overlap).
template <int CB, bool Skip, class Ld>
inline void accumulate_pv_row(const float* P, const Ld& ld, int64_t n, float* O, int64_t c0) {
  __m512 o[CB];
  for (int cc = 0; cc < CB; ++cc) o[cc] = _mm512_loadu_ps(O + 16 * (c0 + cc));
  for (int64_t i = 0; i < n; ++i) {
    const __m512 p = _mm512_set1_ps(P[i]);
    for (int cc = 0; cc < CB; ++cc) o[cc] = fma_p<Skip>(p, ld(i, c0 + cc), o[cc]);
  }
  for (int cc = 0; cc < CB; ++cc) _mm512_storeu_ps(O + 16 * (c0 + cc), o[cc]);
}

template <bool Skip, class Ld>
void pv_row(const float* P, const Ld& ld, int64_t n, float* O, int64_t d16) {
  const int64_t nd = d16 / 16;
  for (int64_t c0 = 0; c0 < nd; c0 += 8) {
    switch (nd - c0 < 8 ? nd - c0 : 8) {
      case 1: accumulate_pv_row<1, Skip>(P, ld, n, O, c0); break;
      case 2: accumulate_pv_row<2, Skip>(P, ld, n, O, c0); break;
      case 3: accumulate_pv_row<3, Skip>(P, ld, n, O, c0); break;
      case 4: accumulate_pv_row<4, Skip>(P, ld, n, O, c0); break;
      case 5: accumulate_pv_row<5, Skip>(P, ld, n, O, c0); break;
      case 6: accumulate_pv_row<6, Skip>(P, ld, n, O, c0); break;
      case 7: accumulate_pv_row<7, Skip>(P, ld, n, O, c0); break;
      default: accumulate_pv_row<8, Skip>(P, ld, n, O, c0); break;
    }
  }
}

// Blocks of 4 rows, the last block 1-6 rows, so that a verification of 4 or 5 drafts (5
// or 6 rows a kv head) reads and widens each K chunk once: 5 x 4 or 6 x 4 accumulators
// (plus 4 K vectors and the query's) still fit the 32 registers.
template <class Ld>
void scores_rows(const float* q, int64_t R, int64_t d16, const Ld& ld, int64_t n, float* S,
                 int64_t ss) {
  int64_t r = 0;
  for (; R - r > 6; r += 4) scores<4, 4>(q + r * d16, d16, ld, n, S + ss * r, ss);
  const float* qr = q + r * d16;
  float* Sr = S + ss * r;
  switch (R - r) {
    case 6: scores<6, 4>(qr, d16, ld, n, Sr, ss); break;
    case 5: scores<5, 4>(qr, d16, ld, n, Sr, ss); break;
    case 4: scores<4, 4>(qr, d16, ld, n, Sr, ss); break;
    case 3: scores<3, 4>(qr, d16, ld, n, Sr, ss); break;
    case 2: scores<2, 8>(qr, d16, ld, n, Sr, ss); break;
    case 1: scores<1, 16>(qr, d16, ld, n, Sr, ss); break;
    default: break;
  }
}

// Blocks of 8 rows, the last block 4-8 rows in one pass over V (each V chunk read and
// widened once for all of them); 1-3 rows go one at a time (pv_row: several chunks as
// independent FMA chains, which 1-3 row accumulators would not give).
template <bool Skip, class Ld>
void pv_rows(const float* P, int64_t ps, int64_t R, const Ld& ld, int64_t n, float* O,
             int64_t d16) {
  int64_t r = 0;
  for (; R - r > 8; r += 8) accumulate_pv<8, Skip>(P + ps * r, ps, ld, n, O + r * d16, d16);
  const float* Pr = P + ps * r;
  float* Or = O + r * d16;
  switch (R - r) {
    case 8: accumulate_pv<8, Skip>(Pr, ps, ld, n, Or, d16); return;
    case 7: accumulate_pv<7, Skip>(Pr, ps, ld, n, Or, d16); return;
    case 6: accumulate_pv<6, Skip>(Pr, ps, ld, n, Or, d16); return;
    case 5: accumulate_pv<5, Skip>(Pr, ps, ld, n, Or, d16); return;
    case 4: accumulate_pv<4, Skip>(Pr, ps, ld, n, Or, d16); return;
    default: break;
  }
  for (; r < R; ++r) pv_row<Skip>(P + ps * r, ld, n, O + r * d16, d16);
}

// At most this many query rows per task read K/V straight from the cache (each chunk
// widened once per block of rows, never stored); more rows widen the tile to fp32 once and
// share it. The two give the same bits.
constexpr int64_t kDirectRows = 8;

template <DType CT>
void task(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t) {
  const Task k = task_of(a, p, t);
  const CacheLayout& c = a.layout;
  const int64_t R = p.rows, D = a.head_dim;
  const int64_t nd = (D + 15) / 16, d16 = 16 * nd;
  const bool direct = R <= kDirectRows || (CT == DType::kFloat32 && D % 16 == 0);
  thread_local std::vector<float> buf;
  thread_local std::vector<int64_t> lim;  // keys j < lim[r] are visible to query row r
  thread_local std::vector<__mmask16> masks;
  buf.resize(static_cast<size_t>(2 * R * d16 + kBlock * R + 2 * R + (2 * kTile + 1) * d16));
  lim.resize(static_cast<size_t>(R));
  masks.resize(static_cast<size_t>(nd));
  float* q = buf.data();
  float* O = q + R * d16;
  float* S = O + R * d16;  // a block's scores, then probabilities, [R][kBlock]
  float* m = S + kBlock * R;
  float* l = m + R;
  float* kt = l + R;
  float* vt = kt + kTile * d16;
  float* zero = vt + kTile * d16;  // an empty row: zero values (and zero exponents)
  memset(zero, 0, sizeof(float) * static_cast<size_t>(d16));
  for (int64_t cc = 0; cc < nd; ++cc) masks[static_cast<size_t>(cc)] = tail_mask(D - 16 * cc);

  const DType qt = a.q_type;
  const float scale = a.scale;  // a local: the stores into q could alias `a`
  for (int64_t r = 0; r < R; ++r) {
    const int64_t qo = q_offset(a, p, k.b, k.kvh, r);
    float* qr = q + r * d16;
    switch (qt) {  // one loop per dtype, which the compiler vectorises
      case DType::kFloat32:
        for (int64_t i = 0; i < D; ++i) qr[i] = static_cast<const float*>(a.q)[qo + i] * scale;
        break;
      default:
        for (int64_t i = 0; i < D; ++i) qr[i] = load_float(a.q, qt, qo + i) * scale;
    }
    for (int64_t i = D; i < d16; ++i) qr[i] = 0.0f;
    m[r] = -INFINITY;
    l[r] = 0.0f;
    lim[static_cast<size_t>(r)] = k.length - a.q_len + r / p.group + 1;
  }
  memset(O, 0, sizeof(float) * static_cast<size_t>(R * d16));

  const void* kraw[kBlock];  // the block's rows (an empty row: zero)
  const void* vraw[kBlock];
  const uint8_t* kexp[kBlock];
  const uint8_t* vexp[kBlock];
  const float* kp[kTile];  // widened tile rows (more than kDirectRows query rows)
  const float* vp[kTile];
  uint32_t valid[kBlock / kTile];  // per tile: its rows that hold a key
  const uint8_t* zero_exp = reinterpret_cast<const uint8_t*>(zero);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  constexpr int64_t esz = dtype_size(CT);
  const int64_t row_bytes = D * esz;
  for (int64_t jb = k.j0; jb < k.j1; jb += kBlock) {
    const int64_t nt = ((k.j1 - jb < kBlock ? k.j1 - jb : kBlock) + kTile - 1) / kTile;
    // Pass 1, tile by tile: where the rows are, and every query row's 16 scores.
    uint32_t any = 0;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t j = jb + kTile * t;
      const int64_t n = k.j1 - j < kTile ? k.j1 - j : kTile;
      // Rows of one kv head are Hkv * D elements apart: prefetch the tile after next so
      // DRAM latency hides behind this tile's arithmetic. Into L2 (prefetcht1): 64 lines a
      // tile at T0 filled L1's miss buffers and the prefetches themselves stalled; a layer's
      // 160-position fp16 cache of 12 heads read after 6 MB of weights took 133-144 us at
      // one thread with T0, 76-82 us with T1 (AMD EPYC VM,
      // benchmarks/decode_attention_cache.py "streamed"). Keep this loop here: moved into a
      // helper function, GCC dropped the prefetches.
      for (int64_t i = j + kPrefetchRows; i < j + kPrefetchRows + kTile && i < k.j1; ++i) {
        const RowLoc loc = locate(c, k.b, i);
        if (loc.i0 < 0) continue;
        const int64_t off = (loc.i0 * c.stride0 + loc.i1 * c.stride1 + k.kvh * c.stride2) * esz;
        for (int64_t line = 0; line < row_bytes; line += 64) {
          _mm_prefetch(static_cast<const char*>(a.k) + off + line, _MM_HINT_T1);
          _mm_prefetch(static_cast<const char*>(a.v) + off + line, _MM_HINT_T1);
        }
      }
      const void** kr = kraw + kTile * t;
      const void** vr = vraw + kTile * t;
      const uint8_t** ke = kexp + kTile * t;
      const uint8_t** ve = vexp + kTile * t;
      const CacheRows<CT> kd{kr, ke, masks.data()};
      uint32_t ok = 0;
      for (int64_t i = 0; i < kTile; ++i) {
        kr[i] = vr[i] = kp[i] = zero;
        ke[i] = ve[i] = zero_exp;
        if (i >= n) continue;
        const RowLoc loc = locate(c, k.b, j + i);
        if (loc.i0 < 0) continue;
        ok |= 1u << i;
        const int64_t off = loc.i0 * c.stride0 + loc.i1 * c.stride1 + k.kvh * c.stride2;
        kr[i] = static_cast<const char*>(a.k) + off * esz;
        vr[i] = static_cast<const char*>(a.v) + off * esz;
        if (CT == kMxint8) {
          const int64_t eoff =
              loc.i0 * c.exp_stride0 + loc.i1 * c.exp_stride1 + k.kvh * c.exp_stride2;
          ke[i] = a.k_exp + eoff;
          ve[i] = a.v_exp + eoff;
        }
        if (!direct) {
          widen_row(kd, i, nd, kt + i * d16);
          kp[i] = kt + i * d16;
        }
      }
      valid[t] = ok;
      any |= ok;
      if (!ok) continue;
      if (direct) scores_rows(q, R, d16, kd, n, S + kTile * t, kBlock);
      else scores_rows(q, R, d16, F32Rows{kp}, n, S + kTile * t, kBlock);
    }
    if (!any) continue;

    // The block's softmax, row by row: one max and one sum over all its tiles (not a
    // reduction, compare and rescale per tile: with one query row that chain was most of
    // a tile's time). Causal + validity mask; the accumulator row is rescaled only when m
    // grows; p = exp(s - m) (vector exp, range reduction + degree-6 polynomial +
    // vscalefps, about 2 ulp). A score of -inf weighs 0 (all -inf: the row sees no key),
    // never exp(-inf + inf); a NaN score is kept, and so reaches the row's output.
    uint32_t hidden = 0;  // tiles with a valid row hidden from some query row
    for (int64_t r = 0; r < R; ++r) {
      float* Sr = S + kBlock * r;
      __m512 mx = neg_inf;
      for (int64_t t = 0; t < nt; ++t) {
        if (!valid[t]) continue;
        const int64_t see = lim[static_cast<size_t>(r)] - (jb + kTile * t);
        const uint32_t causal = see >= kTile ? 0xffffu : (see <= 0 ? 0u : (1u << see) - 1u);
        const __mmask16 mk = static_cast<__mmask16>(valid[t] & causal);
        if (mk != valid[t]) hidden |= 1u << t;
        const __m512 s = _mm512_mask_mov_ps(neg_inf, mk, _mm512_loadu_ps(Sr + kTile * t));
        _mm512_storeu_ps(Sr + kTile * t, s);
        mx = _mm512_max_ps(s, mx);
      }
      const float bmax = _mm512_reduce_max_ps(mx);
      if (bmax > m[r]) {
        const float alpha = expf(m[r] - bmax);  // 0 when m was -inf
        l[r] *= alpha;
        float* o = O + r * d16;
        const __m512 av = _mm512_set1_ps(alpha);
        for (int64_t cc = 0; cc < nd; ++cc)
          _mm512_storeu_ps(o + 16 * cc, _mm512_mul_ps(_mm512_loadu_ps(o + 16 * cc), av));
        m[r] = bmax;
      }
      const __m512 mv = _mm512_set1_ps(m[r]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < nt; ++t) {
        if (!valid[t]) continue;
        const __m512 s = _mm512_loadu_ps(Sr + kTile * t);
        const __mmask16 live = _mm512_cmp_ps_mask(s, neg_inf, _CMP_NEQ_UQ);
        const __m512 pv = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, mv)));
        _mm512_storeu_ps(Sr + kTile * t, pv);
        sum = _mm512_add_ps(sum, pv);
      }
      l[r] += _mm512_reduce_add_ps(sum);
    }

    // Pass 2, tile by tile: O += P V.
    for (int64_t t = 0; t < nt; ++t) {
      if (!valid[t]) continue;
      const int64_t n = k.j1 - (jb + kTile * t) < kTile ? k.j1 - (jb + kTile * t) : kTile;
      const auto accumulate = [&](const auto& ld) {
        if (hidden >> t & 1u) pv_rows<true>(S + kTile * t, kBlock, R, ld, n, O, d16);
        else pv_rows<false>(S + kTile * t, kBlock, R, ld, n, O, d16);
      };
      const CacheRows<CT> vd{vraw + kTile * t, vexp + kTile * t, masks.data()};
      if (direct) {
        accumulate(vd);
        continue;
      }
      for (int64_t i = 0; i < kTile; ++i) {
        vp[i] = zero;
        if (valid[t] >> i & 1u) {
          widen_row(vd, i, nd, vt + i * d16);
          vp[i] = vt + i * d16;
        }
      }
      accumulate(F32Rows{vp});
    }
  }

  float* out = task_out(a, p, ws, t);
  float* lse = task_lse(a, p, ws, t);
  for (int64_t r = 0; r < R; ++r) {
    const bool any = l[r] != 0.0f;  // a NaN l (NaN in the cache) propagates
    const __m512 inv = _mm512_set1_ps(any ? 1.0f / l[r] : 0.0f);
    for (int64_t cc = 0; cc < nd; ++cc)
      _mm512_mask_storeu_ps(out + r * D + 16 * cc, tail_mask(D - 16 * cc),
                            _mm512_mul_ps(_mm512_loadu_ps(O + r * d16 + 16 * cc), inv));
    lse[r] = any ? m[r] + logf(l[r]) : -INFINITY;
  }
}

}  // namespace

void decode_task_avx512(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t) {
  switch (a.cache_type) {
    case DType::kFloat32: task<DType::kFloat32>(a, p, ws, t); break;
    case DType::kBFloat16: task<DType::kBFloat16>(a, p, ws, t); break;
    case DType::kFloat16: task<DType::kFloat16>(a, p, ws, t); break;
    case kMxint8: task<kMxint8>(a, p, ws, t); break;
  }
}

}  // namespace cpu
}  // namespace decode
}  // namespace llmcore

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // __x86_64__
