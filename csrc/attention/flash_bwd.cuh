// Fused attention backward (FlashAttention-2): dQ, dK, dV from dO, Q, K, V, lse and
// dsum = rowsum(dO * O) (computed beforehand by attention_cuda.cu's preprocess kernel).
//
//   P = exp(scale S - lse)   recomputed tile by tile, S = Q K^T
//   dV = P^T dO      dP = dO V^T      dS = P * (dP - dsum)
//   dK = scale dS^T Q             dQ = scale dS K
//
// dK/dV kernel: one CTA of 4 warps per (key block of kBc = 64 keys, batch, query head);
// warp w owns keys 16w .. 16w+15 and keeps their dK, dV rows in registers across the loop
// over query blocks (kBr rows; skipped when entirely above the causal diagonal). It works
// on the transposed scores, so the key axis is the MMA's M axis:
//   S^T = K Q^T, dP^T = V dO^T          A = K / V rows (ldmatrix), B = Q / dO ([n][k])
//   P^T, dS^T in registers              lse, dsum of the block's query rows in shared
//   dV += P^T dO, dK += dS^T Q          A = P^T / dS^T registers, B = dO / Q (.trans)
// Q/dO/lse/dsum of the next query block are copied (cp.async) while this one computes.
// kAtomicDQ (the default, non-deterministic path): dS^T is also stored to shared memory
// and the warps compute dQ_block = dS K (A = dS by ldmatrix.trans of dS^T, B = K
// .trans) and atomically add it, scaled, into the fp32 dq_accum.
// The dK/dV rows go to dk/dv (scaled, in T) when heads == kv_heads, else to the fp32
// per-query-head dk_accum/dv_accum that attention_cuda.cu sums over each group.
//
// dQ kernel (deterministic path): one CTA of 4 warps per (query block of 64 rows, batch,
// head); each warp owns 16 query rows, loops over key tiles (two-stage cp.async
// pipeline), recomputes P and dS like the forward and accumulates dQ = dS K in registers
// (A = dS registers, B = K .trans); written once, so results are bit-reproducible.
//
// Out-of-range rows: query rows past Sq get lse = +inf (P = 0) and dsum 0; key rows past
// Sk are masked to P = 0 (their zero-filled K/V rows would otherwise give P != 0); a row
// that saw no key in the forward (lse = -inf) also gets +inf, so all its gradients are 0.
#pragma once

#include "attention/flash_common.cuh"

namespace llmcore {
namespace attention {
namespace cuda {

// dK/dV kernel tiles. Shared memory: K, V [64][D+8], Q, dO [2][kBr][D+8], dS^T [64][kBr+8],
// lse, dsum [2][kBr] fp32: D=32 40 KB, 64 64 KB, 96 58 KB, 128 54 KB. kBr shrinks with D so
// that dK, dV (2 D/2 registers per thread), S^T and dP^T fit in 255 registers unspilled.
template <int D>
struct BwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBc = 16 * kWarps;         // keys per CTA
  static constexpr int kBr = D <= 64 ? 64 : (D <= 96 ? 32 : 16);  // query rows per step
  static constexpr int kStride = layout::smem_stride(D);
  static constexpr int kStrideS = layout::smem_stride(kBr);
  static constexpr int kSmemBytes = (2 * kBc * kStride + 4 * kBr * kStride + kBc * kStrideS) * 2 +
                                    4 * kBr * 4;
  // dQ inside the dK/dV kernel: kBr / 16 row tiles, each split over kWarps / (kBr / 16)
  // warps by columns.
  static constexpr int kRowTiles = kBr / 16;
  static constexpr int kWarpsPerRowTile = kWarps / kRowTiles;
  static constexpr int kDqCols = D / kWarpsPerRowTile;
  static_assert(kDqCols % 16 == 0, "dQ column split");
};

// Deterministic dQ kernel tiles. Shared memory: Q, dO [64][D+8], K, V [2][kBc][D+8]:
// D=32 30 KB, 64 54 KB, 96 52 KB, 128 68 KB.
template <int D>
struct BwdDqTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBr = 16 * kWarps;
  static constexpr int kBc = D <= 64 ? 64 : 32;
  static constexpr int kStride = layout::smem_stride(D);
  static constexpr int kSmemBytes = (2 * kBr * kStride + 4 * kBc * kStride) * 2;
};

template <typename T, int D, bool kCausal, bool kAtomicDQ>
__global__ void __launch_bounds__(BwdTraits<D>::kThreads)
flash_bwd_dkdv_kernel(const BwdParams p) {
  using Tr = BwdTraits<D>;
  constexpr int kBr = Tr::kBr, kBc = Tr::kBc, kThreads = Tr::kThreads;
  constexpr int kStride = Tr::kStride, kStrideS = Tr::kStrideS;
  constexpr int kQT = kBr / 8;  // n8 tiles of S^T per warp (query columns)
  constexpr int kDT = D / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBc * kStride;
  T* sQ = sV + kBc * kStride;       // [2][kBr][kStride]
  T* sdO = sQ + 2 * kBr * kStride;  // [2][kBr][kStride]
  T* sdS = sdO + 2 * kBr * kStride; // [kBc][kStrideS]: dS^T
  float* sLse = reinterpret_cast<float*>(sdS + kBc * kStrideS);  // [2][kBr], log2 domain
  float* sDsum = sLse + 2 * kBr;                                 // [2][kBr]

  const int n_block = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const int hk = h / (p.heads / p.kv_heads);
  const SeqInfo si = seq_info(p, b);
  const int n0 = n_block * kBc;
  if (n0 >= si.sk) return;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wrow = warp * 16;  // the warp's first key row in the tile

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* do_base = static_cast<const T*>(p.dout);
  const T* q = q_base + b * p.q_batch_stride + si.q_off * p.q_row_stride + h * p.q_head_stride;
  const T* dout = do_base + b * p.do_batch_stride + si.q_off * p.do_row_stride + h * p.do_head_stride;
  const T* k = k_base + b * p.k_batch_stride + (si.k_off + n0) * p.k_row_stride + hk * p.k_head_stride;
  const T* v = v_base + b * p.v_batch_stride + (si.k_off + n0) * p.v_row_stride + hk * p.v_head_stride;
  const int64_t lse_off = b * p.lse_batch_stride + h * p.lse_head_stride + si.q_off;
  const float* lse = p.lse + lse_off;
  const float* dsum = p.dsum + lse_off;

  // Query blocks before m_first see none of this block's keys.
  const int m_first = layout::first_query_block(n0, kBr, si.sq, si.sk, kCausal);
  const int m_blocks = (si.sq + kBr - 1) / kBr;

  auto load_q_block = [&](int mb, int st) {
    const int m0 = mb * kBr;
    load_tile<kBr, D, kThreads>(sQ + st * kBr * kStride, q + m0 * p.q_row_stride, p.q_row_stride,
                                si.sq - m0, q_base, tid);
    load_tile<kBr, D, kThreads>(sdO + st * kBr * kStride, dout + m0 * p.do_row_stride,
                                p.do_row_stride, si.sq - m0, do_base, tid);
    for (int i = tid; i < kBr; i += kThreads) {
      const int row = m0 + i;
      float l = kInf, d = 0.0f;  // rows past Sq: P = 0
      if (row < si.sq) {
        l = lse[row];
        l = l == -kInf ? kInf : l * kLog2e;  // a row that saw no key: P = 0
        d = dsum[row];
      }
      sLse[st * kBr + i] = l;
      sDsum[st * kBr + i] = d;
    }
  };

  load_tile<kBc, D, kThreads>(sK, k, p.k_row_stride, si.sk - n0, k_base, tid);
  load_tile<kBc, D, kThreads>(sV, v, p.v_row_stride, si.sk - n0, v_base, tid);
  if (m_first < m_blocks) load_q_block(m_first, 0);
  ptx::cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
  for (int j = 0; j < kDT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_dk[j][r] = acc_dv[j][r] = 0.0f;

  for (int mb = m_first; mb < m_blocks; ++mb) {
    const int st = (mb - m_first) & 1;
    if (mb + 1 < m_blocks) {
      load_q_block(mb + 1, st ^ 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // this block's Q, dO, lse, dsum are visible
    const int m0 = mb * kBr;
    const T* cQ = sQ + st * kBr * kStride;
    const T* cdO = sdO + st * kBr * kStride;
    const float* cLse = sLse + st * kBr;
    const float* cDsum = sDsum + st * kBr;

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x kBr queries.
    float s[kQT][4], dpt[kQT][4];
#pragma unroll
    for (int j = 0; j < kQT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[j][r] = dpt[j][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      const int a_off = (wrow + layout::ldm_a_row(lane)) * kStride + kk * 16 + layout::ldm_a_col(lane);
      ptx::ldmatrix_x4(ak, sK + a_off);
      ptx::ldmatrix_x4(av, sV + a_off);
#pragma unroll
      for (int np = 0; np < kQT / 2; ++np) {
        const int b_off = (np * 16 + layout::ldm_b_row(lane)) * kStride + kk * 16 + layout::ldm_b_col(lane);
        uint32_t bq[4], bo[4];
        ptx::ldmatrix_x4(bq, cQ + b_off);
        ptx::ldmatrix_x4(bo, cdO + b_off);
        ptx::mma_16816<T>(s[2 * np], ak, bq[0], bq[1]);
        ptx::mma_16816<T>(s[2 * np + 1], ak, bq[2], bq[3]);
        ptx::mma_16816<T>(dpt[2 * np], av, bo[0], bo[1]);
        ptx::mma_16816<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P^T = exp2(S^T scale log2e - lse) (masked to 0), dS^T = P^T (dP^T - dsum).
    const bool need_mask = layout::tile_needs_mask(m0, n0, kBc, si.sq, si.sk, kCausal);
#pragma unroll
    for (int j = 0; j < kQT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int qc = j * 8 + layout::c_col(lane, r);  // query column in the block
        float pv = exp2f(s[j][r] * scale_log2 - cLse[qc]);
        if (need_mask) {
          const int key = n0 + wrow + layout::c_row(lane, r);
          if (!layout::visible(m0 + qc, key, si.sq, si.sk, kCausal)) pv = 0.0f;
        }
        s[j][r] = pv;
        dpt[j][r] = pv * (dpt[j][r] - cDsum[qc]);
      }

    // dV += P^T dO, dK += dS^T Q (the query axis is the MMA's K axis).
#pragma unroll
    for (int kk = 0; kk < kBr / 16; ++kk) {
      uint32_t ap[4], ads[4];
      c_to_a<T>(ap, s[2 * kk], s[2 * kk + 1]);
      c_to_a<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        const int b_off = (kk * 16 + layout::ldm_a_row(lane)) * kStride + dp * 16 + layout::ldm_a_col(lane);
        uint32_t bo[4], bq[4];
        ptx::ldmatrix_x4_trans(bo, cdO + b_off);
        ptx::ldmatrix_x4_trans(bq, cQ + b_off);
        ptx::mma_16816<T>(acc_dv[2 * dp], ap, bo[0], bo[1]);
        ptx::mma_16816<T>(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
        ptx::mma_16816<T>(acc_dk[2 * dp], ads, bq[0], bq[1]);
        ptx::mma_16816<T>(acc_dk[2 * dp + 1], ads, bq[2], bq[3]);
      }
    }

    if constexpr (kAtomicDQ) {
      // dS^T -> shared (rounded to T, as the dK product used it).
#pragma unroll
      for (int j = 0; j < kQT; ++j)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = wrow + layout::c_row(lane, 2 * i), c = j * 8 + layout::c_col(lane, 2 * i);
          *reinterpret_cast<uint32_t*>(sdS + r * kStrideS + c) = pack2<T>(dpt[j][2 * i], dpt[j][2 * i + 1]);
        }
      __syncthreads();  // all of dS^T is visible
      // dQ_block [kBr x D] += dS [kBr x kBc] K [kBc x D]: this warp's row tile and columns.
      const int rt = warp % Tr::kRowTiles;
      const int c_begin = (warp / Tr::kRowTiles) * Tr::kDqCols;
      const int q_row0 = m0 + rt * 16;
#pragma unroll 1  // one 16-column chunk live at a time (register pressure)
      for (int cc = 0; cc < Tr::kDqCols / 16; ++cc) {
        const int c0 = c_begin + cc * 16;
        float dq[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) dq[j][r] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
          uint32_t a[4], bk[4];
          // A[m = query][k = key] = dS^T[key][query]: transposed load of dS^T.
          ptx::ldmatrix_x4_trans(a, sdS + (kk * 16 + layout::ldm_b_row(lane)) * kStrideS + rt * 16 +
                                   layout::ldm_b_col(lane));
          ptx::ldmatrix_x4_trans(bk, sK + (kk * 16 + layout::ldm_a_row(lane)) * kStride + c0 +
                                    layout::ldm_a_col(lane));
          ptx::mma_16816<T>(dq[0], a, bk[0], bk[1]);
          ptx::mma_16816<T>(dq[1], a, bk[2], bk[3]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int row = q_row0 + layout::c_row(lane, r);
            if (row < si.sq) {
              const int col = c0 + j * 8 + layout::c_col(lane, r);
              float* dst = p.dq_accum + b * p.acc_q_batch_stride +
                           ((si.q_off + row) * p.heads + h) * static_cast<int64_t>(D) + col;
              atomicAdd(dst, dq[j][r] * p.scale);
            }
          }
      }
    }
    __syncthreads();  // every warp is done with this stage (and dS^T) before refills
  }

  ptx::cp_async_wait<0>();  // no copy may still be in flight when the CTA exits (empty loop)

  // dK (scaled), dV: straight to dk/dv when heads == kv_heads, else per query head to the
  // fp32 buffers that the group reduction sums.
#pragma unroll
  for (int j = 0; j < kDT; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int kr = wrow + layout::c_row(lane, 2 * i), col = j * 8 + layout::c_col(lane, 2 * i);
      const int key = n0 + kr;
      if (key >= si.sk) continue;
      const float dk0 = acc_dk[j][2 * i] * p.scale, dk1 = acc_dk[j][2 * i + 1] * p.scale;
      const float dv0 = acc_dv[j][2 * i], dv1 = acc_dv[j][2 * i + 1];
      const int64_t row = si.k_off + key;
      if (p.dk_accum == nullptr) {
        T* dk = static_cast<T*>(p.dk) + b * p.dk_batch_stride + row * p.dk_row_stride +
                hk * p.dk_head_stride + col;
        T* dv = static_cast<T*>(p.dv) + b * p.dv_batch_stride + row * p.dv_row_stride +
                hk * p.dv_head_stride + col;
        *reinterpret_cast<uint32_t*>(dk) = pack2<T>(dk0, dk1);
        *reinterpret_cast<uint32_t*>(dv) = pack2<T>(dv0, dv1);
      } else {
        const int64_t off = b * p.acc_k_batch_stride + (row * p.heads + h) * static_cast<int64_t>(D) + col;
        *reinterpret_cast<float2*>(p.dk_accum + off) = make_float2(dk0, dk1);
        *reinterpret_cast<float2*>(p.dv_accum + off) = make_float2(dv0, dv1);
      }
    }
}

template <typename T, int D, bool kCausal>
__global__ void __launch_bounds__(BwdDqTraits<D>::kThreads)
flash_bwd_dq_kernel(const BwdParams p) {
  using Tr = BwdDqTraits<D>;
  constexpr int kBr = Tr::kBr, kBc = Tr::kBc, kThreads = Tr::kThreads, kStride = Tr::kStride;
  constexpr int kNT = kBc / 8;
  constexpr int kDT = D / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBr * kStride;
  T* sK = sdO + kBr * kStride;  // [2][kBc][kStride]
  T* sV = sK + 2 * kBc * kStride;

  const int m_block = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const int hk = h / (p.heads / p.kv_heads);
  const SeqInfo si = seq_info(p, b);
  const int m0 = m_block * kBr;
  if (m0 >= si.sq) return;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wrow = warp * 16;

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* do_base = static_cast<const T*>(p.dout);
  const T* q = q_base + b * p.q_batch_stride + (si.q_off + m0) * p.q_row_stride + h * p.q_head_stride;
  const T* dout = do_base + b * p.do_batch_stride + (si.q_off + m0) * p.do_row_stride + h * p.do_head_stride;
  const T* k = k_base + b * p.k_batch_stride + si.k_off * p.k_row_stride + hk * p.k_head_stride;
  const T* v = v_base + b * p.v_batch_stride + si.k_off * p.v_row_stride + hk * p.v_head_stride;

  const int64_t n_limit = layout::key_limit(m0, kBr, si.sq, si.sk, kCausal);
  const int n_tiles = static_cast<int>((n_limit + kBc - 1) / kBc);

  auto load_kv = [&](int nt, int st) {
    const int n0 = nt * kBc;
    load_tile<kBc, D, kThreads>(sK + st * kBc * kStride, k + n0 * p.k_row_stride, p.k_row_stride,
                                si.sk - n0, k_base, tid);
    load_tile<kBc, D, kThreads>(sV + st * kBc * kStride, v + n0 * p.v_row_stride, p.v_row_stride,
                                si.sk - n0, v_base, tid);
  };
  load_tile<kBr, D, kThreads>(sQ, q, p.q_row_stride, si.sq - m0, q_base, tid);
  load_tile<kBr, D, kThreads>(sdO, dout, p.do_row_stride, si.sq - m0, do_base, tid);
  if (n_tiles > 0) load_kv(0, 0);
  ptx::cp_async_commit();

  // lse (log2 domain) and dsum of the thread's rows g and g + 8.
  float row_lse[2], row_dsum[2];
  {
    const int64_t lse_off = b * p.lse_batch_stride + h * p.lse_head_stride + si.q_off;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = m0 + wrow + layout::c_row(lane, 2 * i);
      float l = kInf, d = 0.0f;
      if (row < si.sq) {
        l = p.lse[lse_off + row];
        l = l == -kInf ? kInf : l * kLog2e;
        d = p.dsum[lse_off + row];
      }
      row_lse[i] = l;
      row_dsum[i] = d;
    }
  }

  const float scale_log2 = p.scale * kLog2e;
  float acc[kDT][4];
#pragma unroll
  for (int j = 0; j < kDT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;

  for (int nt = 0; nt < n_tiles; ++nt) {
    const int st = nt & 1, n0 = nt * kBc;
    if (nt + 1 < n_tiles) {
      load_kv(nt + 1, st ^ 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // K_nt, V_nt (and Q, dO) are visible
    const T* cK = sK + st * kBc * kStride;
    const T* cV = sV + st * kBc * kStride;

    // S = Q K^T, dP = dO V^T.
    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[j][r] = dp[j][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ao[4];
      const int a_off = (wrow + layout::ldm_a_row(lane)) * kStride + kk * 16 + layout::ldm_a_col(lane);
      ptx::ldmatrix_x4(aq, sQ + a_off);
      ptx::ldmatrix_x4(ao, sdO + a_off);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        const int b_off = (np * 16 + layout::ldm_b_row(lane)) * kStride + kk * 16 + layout::ldm_b_col(lane);
        uint32_t bk[4], bv[4];
        ptx::ldmatrix_x4(bk, cK + b_off);
        ptx::ldmatrix_x4(bv, cV + b_off);
        ptx::mma_16816<T>(s[2 * np], aq, bk[0], bk[1]);
        ptx::mma_16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        ptx::mma_16816<T>(dp[2 * np], ao, bv[0], bv[1]);
        ptx::mma_16816<T>(dp[2 * np + 1], ao, bv[2], bv[3]);
      }
    }

    // P = exp2(S scale log2e - lse) (masked to 0), dS = P (dP - dsum).
    const bool need_mask = layout::tile_needs_mask(m0, n0, kBc, si.sq, si.sk, kCausal);
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = r >> 1;
        float pv = exp2f(s[j][r] * scale_log2 - row_lse[i]);
        if (need_mask) {
          const int col = n0 + j * 8 + layout::c_col(lane, r);
          const int64_t row = m0 + wrow + layout::c_row(lane, r);
          if (!layout::visible(row, col, si.sq, si.sk, kCausal)) pv = 0.0f;
        }
        dp[j][r] = pv * (dp[j][r] - row_dsum[i]);
      }

    // dQ += dS K: A = dS from registers, B = K [key][d] by ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bk[4];
        ptx::ldmatrix_x4_trans(bk, cK + (kk * 16 + layout::ldm_a_row(lane)) * kStride + dd * 16 +
                                  layout::ldm_a_col(lane));
        ptx::mma_16816<T>(acc[2 * dd], a, bk[0], bk[1]);
        ptx::mma_16816<T>(acc[2 * dd + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // dQ = scale * acc, staged through the warp's own Q rows, 16-byte stores. A CTA barrier
  // after the wait: those rows were copied by threads of every warp and, with no key tile
  // (n_tiles == 0), nothing else orders the copies before the staging stores.
  ptx::cp_async_wait<0>();
  __syncthreads();
  T* so = sQ + wrow * kStride;
#pragma unroll
  for (int j = 0; j < kDT; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = layout::c_row(lane, 2 * i), c = j * 8 + layout::c_col(lane, 2 * i);
      *reinterpret_cast<uint32_t*>(so + r * kStride + c) =
          pack2<T>(acc[j][2 * i] * p.scale, acc[j][2 * i + 1] * p.scale);
    }
  __syncwarp();
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride + (si.q_off + m0 + wrow) * p.dq_row_stride +
          h * p.dq_head_stride;
  const int rows_left = si.sq - m0 - wrow;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int idx = lane; idx < 16 * kChunksPerRow; idx += 32) {
    const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
    if (r < rows_left)
      *reinterpret_cast<uint4*>(dq + r * p.dq_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(so + r * kStride + c * 8);
  }
}

// The dK/dV kernel (and, deterministic, the dQ kernel). dsum must be ready; dq_accum
// zeroed unless deterministic; the caller converts dq_accum and reduces GQA groups after.
template <typename T, int D>
cudaError_t run_flash_bwd(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<D>;
  using TrQ = BwdDqTraits<D>;
  if (p.head_dim != D) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  if (p.batch > 65535 || p.heads > 65535) return cudaErrorInvalidValue;
  if (!p.deterministic && p.dq_accum == nullptr) return cudaErrorInvalidValue;
  if (p.heads != p.kv_heads && (p.dk_accum == nullptr || p.dv_accum == nullptr))
    return cudaErrorInvalidValue;
  const int64_t n_blocks = (static_cast<int64_t>(p.seqlen_k) + Tr::kBc - 1) / Tr::kBc;
  const int64_t m_blocks = (static_cast<int64_t>(p.seqlen_q) + TrQ::kBr - 1) / TrQ::kBr;
  return LLMCORE_BOOL_SWITCH(p.causal, kCausal, [&] {
    cudaError_t err = LLMCORE_BOOL_SWITCH(!p.deterministic, kAtomicDQ, [&] {
      if (n_blocks == 0) return cudaSuccess;  // no keys: dk, dv are empty
      auto kernel = flash_bwd_dkdv_kernel<T, D, kCausal, kAtomicDQ>;
      cudaError_t e = set_smem(kernel, Tr::kSmemBytes);
      if (e != cudaSuccess) return e;
      kernel<<<dim3(static_cast<unsigned>(n_blocks), p.batch, p.heads), Tr::kThreads,
               Tr::kSmemBytes, stream>>>(p);
      return cudaGetLastError();
    });
    // Deterministic: dQ by its own pass (it writes zeros when there are no keys).
    if (err != cudaSuccess || !p.deterministic || m_blocks == 0) return err;
    auto kernel = flash_bwd_dq_kernel<T, D, kCausal>;
    err = set_smem(kernel, TrQ::kSmemBytes);
    if (err != cudaSuccess) return err;
    kernel<<<dim3(static_cast<unsigned>(m_blocks), p.batch, p.heads), TrQ::kThreads,
             TrQ::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attention
}  // namespace llmcore
