// KV-cached decoding attention (flash-decoding) on tensor cores.
//
// Computes, for every sequence b, query token t < Lq and head h (kv head h / G, G = H/Hkv)
//   out[b, t, h] = softmax_j(scale * q[b, t, h] . K[b, j, h/G]) @ V[b, j, h/G]
// over the keys j <= len_b - Lq + t (len_b = cache_seqlens[b] clamped to the capacity),
// and lse[b, h, t] = log sum_j exp(scale * q . k_j) (natural log; -inf and out = 0 when no
// key is visible). K/V: fp16/bf16 (q's dtype) or MXINT8 (int8 mantissas + one E8M0
// exponent per 32 elements of D), contiguous or paged (decode_cuda.cuh).
//
// Algorithm.
//  - Grid (split, kv_head * row_group, batch). The rows of one kv head are its G query
//    heads times the Lq queries, r = t * G + g; a row group is up to 64 of them (4 MMA
//    row chunks of 16). One CTA of 4 warps reads its kv head's keys once for all rows.
//  - The keys of a sequence are cut into num_splits contiguous ranges of
//    max(256, ceil(len/splits) rounded up to the 64-key tile) keys; a CTA streams its
//    range in tiles of 64 keys through shared memory with cp.async (16-byte copies,
//    double buffered; rows of absent keys/pages are zero-filled and flagged absent in
//    shared memory, so that the mask excludes them from the softmax).
//    MXINT8: the raw int8 tile is copied the same way (8.25/16 of the bytes) and
//    dequantised exactly once per tile, shared -> shared, into q's dtype; its exponents
//    go through registers one tile ahead.
//  - Warps: with one row chunk (G * Lq <= 16, plain decoding) the 4 warps split the 64
//    keys of a tile 16 each; with two chunks 2 warps per chunk, 32 keys each; with four
//    chunks every warp takes all keys for its chunk. Per 16 keys a warp does S = Q K^T
//    with mma.sync m16n8k16 (Q fragments in registers, K via ldmatrix from an XOR-swizzled
//    tile: conflict-free), masks, runs the online softmax in fp32 (exp2, scale folded in),
//    packs P to 16 bits in registers and accumulates O += P V (V via ldmatrix.trans).
//  - The warps of a chunk merge (m, l, O) through shared memory; with one split the CTA
//    writes out/lse, otherwise a normalised fp32 partial (O/l, lse) per split, which
//    combine_splits_kernel merges by logsumexp.
//
// Numerics: fp32 scores and accumulators; P rounded to q's dtype for the PV product (as
// FlashAttention-2). MXINT8 values are exact in fp32 and in bf16; in fp16 they are exact
// unless they fall outside fp16's range (below 2^-24 they round, above 65504 they
// overflow), which a cache quantised from fp16 data never does except for the rounding of
// tiny values.
//
// Compile alone: nvcc -std=c++17 -O3 -Icsrc -c csrc/decode/decode_attention.cu
//   -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bfp/bfp_rule.h"
#include "common/half_convert.cuh"
#include "common/kernel_setup.h"
#include "common/ptx.cuh"
#include "decode/decode_cuda.cuh"

namespace llmcore {
namespace decode {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 64;           // keys per shared-memory tile
constexpr int kChunkRows = 16;      // rows of one MMA row chunk
constexpr int kGroupRows = kWarps * kChunkRows;  // rows per CTA
constexpr int kMinSplitKeys = 256;  // a split gets at least this many keys
constexpr int kMaxSplits = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// ---- cache addressing ------------------------------------------------------------------

// (i0, i1) = (batch or page, row) of position j of sequence b, or false when the page id
// is outside [0, dim0). The caller guarantees 0 <= j < capacity.
__device__ __forceinline__ bool locate(const CacheGeometry& g, int b, int64_t j, int64_t& i0,
                                       int64_t& i1) {
  if (g.block_table == nullptr) {
    i0 = b;
    i1 = j;
    return true;
  }
  const int64_t slot = j / g.dim1;  // < max_pages since j < max_pages * page_size
  const int32_t page = __ldg(g.block_table + b * g.bt_stride + slot);
  if (page < 0 || page >= g.dim0) return false;
  i0 = page;
  i1 = j - slot * g.dim1;
  return true;
}

// Byte offset in a [kTile][D] 16-bit tile of 16-byte chunk c of row r: chunks are XOR
// swizzled within groups of 8 so that the 8 rows an ldmatrix reads (same c, rows r..r+7)
// and the 8 chunks a quarter-warp writes (same r) hit 8 different bank groups.
template <int D>
__device__ __forceinline__ uint32_t swz(int r, int c) {
  return static_cast<uint32_t>(r * (D * 2) + ((c ^ (r & 7)) << 4));
}

// ---- the split kernel --------------------------------------------------------------------

template <int D, bool INT8>
struct Smem {
  static constexpr int kNB = D / 32;                       // exponent blocks per row
  // Float cache: K stages [2][kTile][D] then V stages, 16-bit, swizzled.
  // INT8 cache: raw K [2][kTile][D] int8, raw V, exponents K [2][kTile][kNB], V, then the
  // dequantised K and V tiles [kTile][D] 16-bit, swizzled.
  static constexpr int kStage16 = kTile * D * 2;
  static constexpr int kRawStage = kTile * D;
  static constexpr int kExpStage = kTile * kNB;
  static constexpr int kRawV = 2 * kRawStage;
  static constexpr int kExpK = 4 * kRawStage;
  static constexpr int kExpV = kExpK + 2 * kExpStage;
  static constexpr int kConvK = kExpV + 2 * kExpStage;  // multiple of 16
  static constexpr int kConvV = kConvK + kStage16;
  static constexpr int kPipe = INT8 ? kConvV + kStage16 : 4 * kStage16;
  // Merge scratch (reuses the pipeline): per warp O [16][D + 8] fp32 (+8: conflict-free
  // float2 stores), then m [warps][16], l [warps][16].
  static constexpr int kORow = D + 8;
  static constexpr int kMerge = (kWarps * kChunkRows * kORow + 2 * kWarps * kChunkRows) * 4;
  static constexpr int kBytes = kPipe > kMerge ? kPipe : kMerge;
  static_assert(kConvK % 16 == 0, "16-byte alignment of the dequantised tiles");
};

template <typename T, int D, bool INT8>
__global__ void __launch_bounds__(kThreads, 2)
decode_split_kernel(const DecodeAttentionParams p) {
  using SM = Smem<D, INT8>;
  constexpr int kChunks = D / 8;          // 16-byte chunks of a 16-bit row
  constexpr int kRawChunks = D / 16;      // 16-byte chunks of an int8 row
  constexpr int kNB = SM::kNB;
  constexpr int kKSteps = D / 16;         // MMA k-steps of Q K^T; also V column pairs
  constexpr int kCopyIters = INT8 ? kTile * kRawChunks / kThreads : kTile * kChunks / kThreads;
  constexpr int kCopyChunks = INT8 ? kRawChunks : kChunks;
  constexpr int kExpIters = kTile * kNB / kThreads;  // exponents per thread per tile (K, V)
  static_assert(kTile * kCopyChunks % kThreads == 0 && kTile * kNB % kThreads == 0, "tiling");

  extern __shared__ __align__(16) unsigned char smem[];
  // Per stage and key row of the tile: 1 if the key exists (below kend and, paged, in a
  // page with an id inside [0, num_pages)), else 0. The mask excludes absent keys: their
  // rows are zero-filled, and a score of 0 would still add exp(0 - m) to the softmax.
  __shared__ unsigned char key_ok[2][kTile];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x;
  const int kvh = blockIdx.y % p.kv_heads;
  const int rgroup = blockIdx.y / p.kv_heads;
  const int b = blockIdx.z;
  const int num_splits = gridDim.x;
  const int G = p.heads / p.kv_heads;
  const int Lq = p.q_len;
  const int R = G * Lq;                          // rows of this kv head
  const int row0 = rgroup * kGroupRows;          // first row of this CTA
  const int rows_here = min(kGroupRows, R - row0);
  int nchunks = (rows_here + kChunkRows - 1) / kChunkRows;
  if (nchunks == 3) nchunks = 4;                 // warps per chunk must divide 4
  const int wpc = kWarps / nchunks;              // warps per row chunk
  const int chunk = warp / wpc, part = warp % wpc;
  const int keys_per_warp = kTile / wpc;         // 16, 32 or 64

  // This sequence's length and this split's key range [kbeg, kend).
  const CacheGeometry& geo = p.geo;
  const int64_t cap = cache_capacity(geo);
  int64_t len = p.cache_seqlens[b];
  len = len < 0 ? 0 : (len > cap ? cap : len);
  int64_t per = (len + num_splits - 1) / num_splits;
  per = (per + kTile - 1) / kTile * kTile;
  per = per < kMinSplitKeys ? kMinSplitKeys : per;
  const int64_t kbeg = min(static_cast<int64_t>(split) * per, len);
  const int64_t kend = min(kbeg + per, len);
  const int ntiles = static_cast<int>((kend - kbeg + kTile - 1) / kTile);

  // This thread's two rows (MMA fragment rows lane/4 and lane/4 + 8 of its chunk).
  const int cr0 = chunk * kChunkRows + (lane >> 2);  // row within the CTA's group
  int64_t lim[2];   // last visible key of each row; -1: none (or a padding row)
  int qoff[2];      // offset of the row's q vector in q / out (elements); -1 padding
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + cr0 + 8 * i;
    if (r < R) {
      const int t = r / G, g = r - t * G;
      lim[i] = len - Lq + t;
      qoff[i] = ((b * Lq + t) * p.heads + kvh * G + g) * D;
    } else {
      lim[i] = -1;
      qoff[i] = -1;
    }
  }

  // Q fragments (A operand, row-major 16 x D): k-step ks holds rows {r0, r1} x columns
  // ks*16 + 2*(lane%4) + {0, 1} and + 8. Loaded as 16-bit values: no alignment assumed.
  uint32_t qf[kKSteps][4];
  {
    const uint16_t* q = static_cast<const uint16_t*>(p.q);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ri = i & 1;                              // a0, a2: r0; a1, a3: r1
        const int col = ks * 16 + 2 * (lane & 3) + (i >> 1) * 8;
        uint32_t v = 0;
        if (qoff[ri] >= 0)
          v = static_cast<uint32_t>(q[qoff[ri] + col]) |
              (static_cast<uint32_t>(q[qoff[ri] + col + 1]) << 16);
        qf[ks][i] = v;
      }
    }
  }

  float o[2 * kKSteps][4];  // O fragments: n-tile nt = columns nt*8 .. nt*8+7
#pragma unroll
  for (int nt = 0; nt < 2 * kKSteps; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[nt][i] = 0.0f;
  float m_run[2] = {kNegInf, kNegInf};  // running max (log2 domain, scale folded in)
  float l_run[2] = {0.0f, 0.0f};        // running sum of this lane's columns
  const float scale_log2 = p.softmax_scale * kLog2e;

  const unsigned char* kbase = static_cast<const unsigned char*>(p.k_cache);
  const unsigned char* vbase = static_cast<const unsigned char*>(p.v_cache);
  const int64_t esize = INT8 ? 1 : 2;
  const int64_t k_head = kvh * p.k_strides.s2, v_head = kvh * p.v_strides.s2;
  const int64_t ke_head = kvh * p.ke_strides.s2, ve_head = kvh * p.ve_strides.s2;

  // Issue the cp.async copies of the tile starting at key `start` into `stage`.
  auto issue_tile = [&](int64_t start, int stage) {
#pragma unroll
    for (int it = 0; it < kCopyIters; ++it) {
      const int idx = tid + it * kThreads;
      const int r = idx / kCopyChunks, c = idx - r * kCopyChunks;
      const int64_t j = start + r;
      int64_t i0 = 0, i1 = 0;
      const bool ok = j < kend && locate(geo, b, j, i0, i1);
      const unsigned char* ksrc = kbase;  // a valid address even when nothing is read
      const unsigned char* vsrc = vbase;
      if (ok) {
        ksrc = kbase + (i0 * p.k_strides.s0 + i1 * p.k_strides.s1 + k_head) * esize + c * 16;
        vsrc = vbase + (i0 * p.v_strides.s0 + i1 * p.v_strides.s1 + v_head) * esize + c * 16;
      }
      uint32_t kdst, vdst;
      if (INT8) {
        kdst = ptx::smem_addr(smem + stage * SM::kRawStage + r * D + c * 16);
        vdst = ptx::smem_addr(smem + SM::kRawV + stage * SM::kRawStage + r * D + c * 16);
      } else {
        kdst = ptx::smem_addr(smem + stage * SM::kStage16 + swz<D>(r, c));
        vdst = ptx::smem_addr(smem + 2 * SM::kStage16 + stage * SM::kStage16 + swz<D>(r, c));
      }
      ptx::cp_async_16(kdst, ksrc, ok ? 16 : 0);
      ptx::cp_async_16(vdst, vsrc, ok ? 16 : 0);
      // One thread per row records its flag (published by the barrier that publishes the
      // tile; the stage's previous flags were released by the barrier that released it).
      if (c == 0) key_ok[stage][r] = ok ? 1 : 0;
    }
    ptx::cp_async_commit();
  };

  // MXINT8: the exponents of a tile, loaded into registers one tile ahead (plain loads do
  // not block until the value is used) and stored to shared memory after the current
  // tile's math. Absent rows get exponent byte 0 (their mantissas are zero-filled).
  uint32_t kexp[kExpIters > 0 ? kExpIters : 1], vexp[kExpIters > 0 ? kExpIters : 1];
  auto load_exps = [&](int64_t start) {
#pragma unroll
    for (int it = 0; it < kExpIters; ++it) {
      const int idx = tid + it * kThreads;
      const int r = idx / kNB, blk = idx - r * kNB;
      const int64_t j = start + r;
      int64_t i0 = 0, i1 = 0;
      kexp[it] = 0;
      vexp[it] = 0;
      if (j < kend && locate(geo, b, j, i0, i1)) {
        kexp[it] = __ldg(p.k_exponent + i0 * p.ke_strides.s0 + i1 * p.ke_strides.s1 + ke_head + blk);
        vexp[it] = __ldg(p.v_exponent + i0 * p.ve_strides.s0 + i1 * p.ve_strides.s1 + ve_head + blk);
      }
    }
  };
  auto store_exps = [&](int stage) {
#pragma unroll
    for (int it = 0; it < kExpIters; ++it) {
      const int idx = tid + it * kThreads;
      smem[SM::kExpK + stage * SM::kExpStage + idx] = static_cast<unsigned char>(kexp[it]);
      smem[SM::kExpV + stage * SM::kExpStage + idx] = static_cast<unsigned char>(vexp[it]);
    }
  };

  // MXINT8: dequantise the raw tile of `stage` into the 16-bit K/V tiles. Each thread
  // takes 16-byte chunks: 16 mantissas, one exponent (32 | 16), two swizzled stores.
  auto dequant_tile = [&](int stage) {
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {
      const unsigned char* raw = smem + (kv ? SM::kRawV : 0) + stage * SM::kRawStage;
      const unsigned char* ex = smem + (kv ? SM::kExpV : SM::kExpK) + stage * SM::kExpStage;
      unsigned char* conv = smem + (kv ? SM::kConvV : SM::kConvK);
#pragma unroll
      for (int it = 0; it < kCopyIters; ++it) {
        const int idx = tid + it * kThreads;
        const int r = idx / kRawChunks, c = idx - r * kRawChunks;
        const uint4 w4 = *reinterpret_cast<const uint4*>(raw + r * D + c * 16);
        const float s = bfp::block_scale(ex[r * kNB + (c >> 1)], 8);
        const uint32_t words[4] = {w4.x, w4.y, w4.z, w4.w};
        uint32_t packed[8];
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          // byte b ^ 0x80 = value + 128, spliced into the float 2^23 + u: exact, no I2F.
          const uint32_t u = words[wi] ^ 0x80808080u;
          float v[4];
#pragma unroll
          for (int e = 0; e < 4; ++e)
            v[e] = ptx::mul_noftz(
                __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440u + e)) - 8388736.0f, s);
          packed[2 * wi] = pack2<T>(v[0], v[1]);
          packed[2 * wi + 1] = pack2<T>(v[2], v[3]);
        }
        *reinterpret_cast<uint4*>(conv + swz<D>(r, 2 * c)) =
            make_uint4(packed[0], packed[1], packed[2], packed[3]);
        *reinterpret_cast<uint4*>(conv + swz<D>(r, 2 * c + 1)) =
            make_uint4(packed[4], packed[5], packed[6], packed[7]);
      }
    }
  };

  // The math of one tile (keys start .. start + kTile) from the 16-bit tiles kt, vt; ok:
  // the tile's key flags.
  auto compute_tile = [&](int64_t start, uint32_t kt, uint32_t vt, const unsigned char* ok) {
    const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: matrix and row this lane addresses
    for (int kk = part * keys_per_warp; kk < (part + 1) * keys_per_warp; kk += 16) {
      const int64_t key0 = start + kk;
      if (key0 >= kend) break;  // warp-uniform
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
      // S = Q K^T: matrices (keys kk..+7 | kk+8..+15) x (cols ks*16..+7 | +8..+15).
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t kf[4];
        ptx::ldmatrix_x4(kf, kt + swz<D>(kk + mr + (mi >> 1) * 8, ks * 2 + (mi & 1)));
        ptx::mma_16816<T>(s[0], qf[ks], kf[0], kf[1]);
        ptx::mma_16816<T>(s[1], qf[ks], kf[2], kf[3]);
      }
      // Mask and online softmax. s[nt][i]: row r_{i/2}, key key0 + nt*8 + 2*(lane%4) + i%2.
      float mx[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int kr = kk + nt * 8 + 2 * (lane & 3) + (i & 1);  // row in the tile
          const int64_t j = start + kr;
          const bool vis = j <= lim[i >> 1] && ok[kr] != 0;  // ok[kr]: j < kend, page valid
          s[nt][i] = vis ? s[nt][i] * scale_log2 : kNegInf;
          mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
        }
      float corr[2], base[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
        mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
        const float m_new = fmaxf(m_run[ri], mx[ri]);
        base[ri] = m_new == kNegInf ? 0.0f : m_new;  // no (-inf) - (-inf)
        corr[ri] = exp2f(m_run[ri] - base[ri]);      // 0 when m_run = -inf
        m_run[ri] = m_new;
      }
      float rowsum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[nt][i] = exp2f(s[nt][i] - base[i >> 1]);  // masked: exp2(-inf) = 0
          rowsum[i >> 1] += s[nt][i];
        }
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) l_run[ri] = l_run[ri] * corr[ri] + rowsum[ri];
#pragma unroll
      for (int nt = 0; nt < 2 * kKSteps; ++nt) {
        o[nt][0] *= corr[0];
        o[nt][1] *= corr[0];
        o[nt][2] *= corr[1];
        o[nt][3] *= corr[1];
      }
      // P (A operand, 16 rows x 16 keys) straight from the S accumulators.
      const uint32_t pf[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                              pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
      // O += P V: matrices (keys kk..+7 | kk+8..+15) x (cols dn*16..+7 | +8..+15), transposed.
#pragma unroll
      for (int dn = 0; dn < kKSteps; ++dn) {
        uint32_t vf[4];
        ptx::ldmatrix_x4_trans(vf, vt + swz<D>(kk + mr + (mi & 1) * 8, dn * 2 + (mi >> 1)));
        ptx::mma_16816<T>(o[2 * dn], pf, vf[0], vf[1]);
        ptx::mma_16816<T>(o[2 * dn + 1], pf, vf[2], vf[3]);
      }
    }
  };

  // ---- the pipeline: copy tile i+1 while computing tile i ----
  if (ntiles > 0) {
    if (INT8) load_exps(kbeg);
    issue_tile(kbeg, 0);
    if (INT8) store_exps(0);  // waits for tile 0's exponents: once per CTA
  }
  for (int i = 0; i < ntiles; ++i) {
    const int stage = i & 1;
    const int64_t start = kbeg + static_cast<int64_t>(i) * kTile;
    const bool more = i + 1 < ntiles;
    if (more) {
      if (INT8) load_exps(start + kTile);
      issue_tile(start + kTile, stage ^ 1);  // that stage was released by the last barrier
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // tile i (and its exponents) visible to all
    if (INT8) {
      dequant_tile(stage);
      __syncthreads();
      compute_tile(start, ptx::smem_addr(smem + SM::kConvK), ptx::smem_addr(smem + SM::kConvV),
                   key_ok[stage]);
      if (more) store_exps(stage ^ 1);
    } else {
      compute_tile(start, ptx::smem_addr(smem + stage * SM::kStage16),
                   ptx::smem_addr(smem + 2 * SM::kStage16 + stage * SM::kStage16), key_ok[stage]);
    }
    __syncthreads();  // stage (and the dequantised tiles) free for reuse
  }

  // ---- merge the warps of each row chunk, then write ----
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    l_run[ri] += __shfl_xor_sync(0xffffffffu, l_run[ri], 1);
    l_run[ri] += __shfl_xor_sync(0xffffffffu, l_run[ri], 2);
  }
  float* mo = reinterpret_cast<float*>(smem);                       // [warps][16][kORow]
  float* ms = mo + kWarps * kChunkRows * SM::kORow;                 // [warps][16]
  float* ls = ms + kWarps * kChunkRows;                             // [warps][16]
  {
    float* ow = mo + warp * kChunkRows * SM::kORow;
    const int fr = lane >> 2;
#pragma unroll
    for (int nt = 0; nt < 2 * kKSteps; ++nt) {
      const int col = nt * 8 + 2 * (lane & 3);
      *reinterpret_cast<float2*>(ow + fr * SM::kORow + col) = make_float2(o[nt][0], o[nt][1]);
      *reinterpret_cast<float2*>(ow + (fr + 8) * SM::kORow + col) = make_float2(o[nt][2], o[nt][3]);
    }
    if ((lane & 3) == 0) {
      ms[warp * kChunkRows + fr] = m_run[0];
      ms[warp * kChunkRows + fr + 8] = m_run[1];
      ls[warp * kChunkRows + fr] = l_run[0];
      ls[warp * kChunkRows + fr + 8] = l_run[1];
    }
  }
  __syncthreads();

  const int items = nchunks * kChunkRows * D;
  for (int idx = tid; idx < items; idx += kThreads) {
    const int c = idx / (kChunkRows * D);
    const int rem = idx - c * kChunkRows * D;
    const int r = rem / D, d = rem - r * D;
    const int grow = row0 + c * kChunkRows + r;
    if (grow >= R) continue;
    const int t = grow / G, g = grow - t * G;
    const int h = kvh * G + g;
    float m_all = kNegInf;
    for (int w = c * wpc; w < (c + 1) * wpc; ++w) m_all = fmaxf(m_all, ms[w * kChunkRows + r]);
    float val = 0.0f, lse = kNegInf;
    if (m_all != kNegInf) {
      float l_all = 0.0f, o_all = 0.0f;
      for (int w = c * wpc; w < (c + 1) * wpc; ++w) {
        const float mw = ms[w * kChunkRows + r];
        if (mw == kNegInf) continue;
        const float f = exp2f(mw - m_all);
        l_all += f * ls[w * kChunkRows + r];
        o_all += f * mo[(w * kChunkRows + r) * SM::kORow + d];
      }
      // l_all >= 1: the warp holding the maximum contributed exp2(0) for that key.
      val = o_all / l_all;
      lse = (m_all + __log2f(l_all)) * kLn2;
    }
    if (num_splits == 1) {
      static_cast<T*>(p.out)[((static_cast<int64_t>(b) * Lq + t) * p.heads + h) * D + d] =
          from_float<T>(val);
      if (d == 0) p.lse[(static_cast<int64_t>(b) * p.heads + h) * Lq + t] = lse;
    } else {
      const int64_t prow =
          ((static_cast<int64_t>(b) * p.heads + h) * Lq + t) * num_splits + split;
      p.partial_out[prow * D + d] = val;
      if (d == 0) p.partial_lse[prow] = lse;
    }
  }
}

// One CTA per (b, h, t) row: out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max).
template <typename T>
__global__ void __launch_bounds__(kThreads)
combine_splits_kernel(const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                      int num_splits, int heads, int q_len, int head_dim, T* __restrict__ out,
                      float* __restrict__ lse) {
  __shared__ float w[kMaxSplits];
  const int64_t row = blockIdx.x;  // ((b * heads + h) * q_len + t)
  const int t = static_cast<int>(row % q_len);
  const int64_t bh = row / q_len;
  const int h = static_cast<int>(bh % heads);
  const int64_t b = bh / heads;
  const float* pl = partial_lse + row * num_splits;
  float m = kNegInf;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, pl[s]);
  T* orow = out + ((b * q_len + t) * heads + h) * head_dim;
  if (m == kNegInf) {  // no split saw a key
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) orow[d] = from_float<T>(0.0f);
    if (threadIdx.x == 0) lse[row] = kNegInf;
    return;
  }
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x)
    w[s] = pl[s] == kNegInf ? 0.0f : __expf(pl[s] - m);
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < num_splits; ++s) total += w[s];  // >= 1 (the maximum's weight)
  const float inv = 1.0f / total;
  const float* po = partial_out + row * num_splits * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < num_splits; ++s)
      if (w[s] != 0.0f) acc += w[s] * po[static_cast<int64_t>(s) * head_dim + d];
    orow[d] = from_float<T>(acc * inv);
  }
  if (threadIdx.x == 0) lse[row] = m + __logf(total);
}

// ---- dispatch ------------------------------------------------------------------------------

using KernelFn = void (*)(const DecodeAttentionParams);

template <typename T, int D>
KernelFn pick_int8(bool int8) {
  return int8 ? decode_split_kernel<T, D, true> : decode_split_kernel<T, D, false>;
}

template <typename T>
KernelFn pick_d(int d, bool int8) {
  switch (d) {
    case 64: return pick_int8<T, 64>(int8);
    case 128: return pick_int8<T, 128>(int8);
    case 256: return pick_int8<T, 256>(int8);
    default: return nullptr;
  }
}

KernelFn pick_kernel(const DecodeAttentionParams& p, int* smem_bytes) {
  if (!decode_attention_supported(p.dtype, p.head_dim)) return nullptr;
  switch (p.head_dim) {
    case 64: *smem_bytes = p.int8_cache ? Smem<64, true>::kBytes : Smem<64, false>::kBytes; break;
    case 128: *smem_bytes = p.int8_cache ? Smem<128, true>::kBytes : Smem<128, false>::kBytes; break;
    default: *smem_bytes = p.int8_cache ? Smem<256, true>::kBytes : Smem<256, false>::kBytes; break;
  }
  return p.dtype == DType::kFloat16 ? pick_d<__half>(p.head_dim, p.int8_cache)
                                    : pick_d<__nv_bfloat16>(p.head_dim, p.int8_cache);
}

int row_groups(const DecodeAttentionParams& p) {
  const int64_t rows = static_cast<int64_t>(p.heads / p.kv_heads) * p.q_len;
  return static_cast<int>((rows + kGroupRows - 1) / kGroupRows);
}

bool aligned16(const void* ptr, const Strides3& s, int64_t esize) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (s.s0 * esize) % 16 == 0 &&
         (s.s1 * esize) % 16 == 0 && (s.s2 * esize) % 16 == 0;
}

bool valid_params(const DecodeAttentionParams& p) {
  if (p.batch < 0 || p.q_len < 0 || p.heads < 0 || p.kv_heads <= 0 || p.heads % p.kv_heads != 0)
    return false;
  if (p.geo.dim0 < 0 || p.geo.dim1 < 0 || cache_capacity(p.geo) > (int64_t{1} << 31) - 1)
    return false;
  if (p.geo.block_table == nullptr && p.geo.dim0 < p.batch) return false;
  if (p.int8_cache && (p.k_exponent == nullptr || p.v_exponent == nullptr)) return false;
  // Every index of the kernel fits in int: rows of q/out and the grid.
  const int64_t q_elems = static_cast<int64_t>(p.batch) * p.q_len * p.heads * p.head_dim;
  if (q_elems > (int64_t{1} << 31) - 1) return false;
  if (p.batch > 65535 || static_cast<int64_t>(p.kv_heads) * row_groups(p) > 65535) return false;
  return true;
}

}  // namespace

bool decode_attention_cache_aligned(const DecodeAttentionParams& p) {
  const int64_t esize = p.int8_cache ? 1 : 2;
  return aligned16(p.k_cache, p.k_strides, esize) && aligned16(p.v_cache, p.v_strides, esize);
}

int decode_attention_num_splits(const DecodeAttentionParams& p, int device) {
  int smem = 0;
  const KernelFn fn = pick_kernel(p, &smem);
  if (fn == nullptr || !valid_params(p) || p.batch == 0 || p.heads == 0 || p.q_len == 0) return 1;
  // SM count and occupancy: queried once per (kernel, device), then cached.
  int sms = 0, per_sm = 0;
  if (cuda_setup::multiprocessor_count(device, &sms) != cudaSuccess ||
      cuda_setup::occupancy_blocks_per_sm(fn, kThreads, smem, &per_sm) != cudaSuccess) {
    cudaGetLastError();  // clear: fall back to one split
    return 1;
  }
  const int64_t slots = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int64_t base = static_cast<int64_t>(p.batch) * p.kv_heads * row_groups(p);
  if (base >= 4 * slots) return 1;  // wave quantisation costs little already
  int64_t max_splits = cache_capacity(p.geo) / kMinSplitKeys;
  max_splits = max_splits < 1 ? 1 : (max_splits > kMaxSplits ? kMaxSplits : max_splits);
  // The split count whose CTAs fill their waves best (ties: fewer splits), each split
  // costing a little (its partial write and the merge).
  int best = 1;
  double best_score = -1.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t ctas = base * s;
    const int64_t waves = (ctas + slots - 1) / slots;
    const double score = static_cast<double>(ctas) / static_cast<double>(waves * slots) -
                         0.002 * static_cast<double>(s);
    if (score > best_score + 1e-9) {
      best_score = score;
      best = static_cast<int>(s);
    }
  }
  return best;
}

cudaError_t decode_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  int smem = 0;
  const KernelFn fn = pick_kernel(p, &smem);
  if (fn == nullptr || !valid_params(p) || !decode_attention_cache_aligned(p))
    return cudaErrorInvalidValue;
  if (p.num_splits < 1 || p.num_splits > kMaxSplits) return cudaErrorInvalidValue;
  if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr))
    return cudaErrorInvalidValue;
  if (p.batch == 0 || p.q_len == 0 || p.heads == 0) return cudaSuccess;
  cudaError_t err = cuda_setup::ensure_dynamic_smem(fn, smem);  // once per (kernel, device)
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(p.kv_heads * row_groups(p)),
                  static_cast<unsigned>(p.batch));
  fn<<<grid, kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  if (p.dtype == DType::kFloat16)
    combine_splits_kernel<__half><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        p.partial_out, p.partial_lse, p.num_splits, p.heads, p.q_len, p.head_dim,
        static_cast<__half*>(p.out), p.lse);
  else
    combine_splits_kernel<__nv_bfloat16><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        p.partial_out, p.partial_lse, p.num_splits, p.heads, p.q_len, p.head_dim,
        static_cast<__nv_bfloat16*>(p.out), p.lse);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decode
}  // namespace llmcore
