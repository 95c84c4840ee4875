// Fused attention forward (FlashAttention-2): out = softmax(scale Q K^T) V and the row
// logsumexp, never materialising the Sq x Sk matrix.
//
// Shapes: q [.., Sq, H, D], k/v [.., Sk, Hkv, D] (fp16/bf16), out like q, lse fp32 (see
// attention_cuda.cuh for strides and varlen). D: a head dim of generated/head_dims.h.
//
// Algorithm. One CTA of kWarps warps per (query block of kBr = 16 kWarps rows, batch, head);
// warp w owns query rows 16w .. 16w+15 of the block for the whole kernel.
//   Q tile -> shared once; for each key tile of kBc keys (K, V by cp.async, 16-byte chunks,
//   rows past Sk zero-filled):
//     S = Q K^T             mma m16n8k16, A = Q (ldmatrix), B = K (ldmatrix, K is [n][k])
//     S *= scale * log2(e)  (log2 domain, so exp is exp2; works for any sign of scale)
//     mask                  only on tiles that cross Sk or the causal diagonal: -inf
//     online softmax        row max over the quad (shfl_xor 1, 2), rescale O and l
//     O += P V              P from the S registers (C -> A layout, rounded to T),
//                           B = V by ldmatrix.trans (V is [k][n])
//   Pipeline (FA2): V_j is copied while S_j is computed; K_{j+1} while softmax and P V_j
//   run; single K and V buffers, two barriers per tile.
//   Key tiles entirely above the causal diagonal are never visited.
// Finalise: l = quad sum; out = O / l (0 for a row that saw no key, whose lse is -inf);
// the warp stages its 16 output rows through its own (no longer needed) Q rows in shared
// memory (after a CTA barrier: other warps' Q copies must have landed) and stores them with
// 16-byte coalesced writes.
#pragma once

#include "attention/flash_common.cuh"

namespace llmcore {
namespace attention {
namespace cuda {

// Tile shapes per head dim: (warps, key tile). Shared memory = (kBr + 2 kBc) (D + 8) 2 B:
// D=32 20 KB, 64 36 KB, 96 52 KB, 128 68 KB, 256 50 KB.
template <int D>
struct FwdTraits {
  static constexpr int kWarps = D <= 128 ? 8 : 4;
  static constexpr int kBr = 16 * kWarps;
  static constexpr int kBc = D <= 128 ? 64 : 16;  // D=256: O alone takes 128 registers
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStride = layout::smem_stride(D);
  static constexpr int kSmemBytes = (kBr + 2 * kBc) * kStride * 2;
};

template <typename T, int D, bool kCausal>
__global__ void __launch_bounds__(FwdTraits<D>::kThreads)
flash_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<D>;
  constexpr int kBr = Tr::kBr, kBc = Tr::kBc, kThreads = Tr::kThreads, kStride = Tr::kStride;
  constexpr int kNT = kBc / 8;  // n8 tiles of S per warp
  constexpr int kDT = D / 8;    // n8 tiles of O per warp

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBr * kStride;
  T* sV = sK + kBc * kStride;

  const int m_block = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const int hk = h / (p.heads / p.kv_heads);
  const SeqInfo si = seq_info(p, b);
  const int m0 = m_block * kBr;
  if (m0 >= si.sq) return;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wrow = warp * 16;  // the warp's first row in the tile

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* q = q_base + b * p.q_batch_stride + (si.q_off + m0) * p.q_row_stride + h * p.q_head_stride;
  const T* k = k_base + b * p.k_batch_stride + si.k_off * p.k_row_stride + hk * p.k_head_stride;
  const T* v = v_base + b * p.v_batch_stride + si.k_off * p.v_row_stride + hk * p.v_head_stride;

  // Keys [0, n_limit) hold all that this block's rows see.
  const int64_t n_limit = layout::key_limit(m0, kBr, si.sq, si.sk, kCausal);
  const int n_tiles = static_cast<int>((n_limit + kBc - 1) / kBc);

  load_tile<kBr, D, kThreads>(sQ, q, p.q_row_stride, si.sq - m0, q_base, tid);
  if (n_tiles > 0) load_tile<kBc, D, kThreads>(sK, k, p.k_row_stride, si.sk, k_base, tid);
  ptx::cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float acc[kDT][4];
#pragma unroll
  for (int j = 0; j < kDT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;
  float row_max[2] = {-kInf, -kInf};  // log2 domain, rows g and g + 8
  float row_sum[2] = {0.0f, 0.0f};    // this thread's partial sums (quad-reduced at the end)

  for (int nt = 0; nt < n_tiles; ++nt) {
    const int n0 = nt * kBc;
    ptx::cp_async_wait<0>();
    __syncthreads();  // K_nt (and Q) landed; every warp is done with V_{nt-1}
    load_tile<kBc, D, kThreads>(sV, v + n0 * p.v_row_stride, p.v_row_stride, si.sk - n0, v_base, tid);
    ptx::cp_async_commit();

    // S = Q K^T for the warp's 16 rows and the kBc keys.
    float s[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[j][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ptx::ldmatrix_x4(a, sQ + (wrow + layout::ldm_a_row(lane)) * kStride + kk * 16 + layout::ldm_a_col(lane));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4];
        ptx::ldmatrix_x4(bk, sK + (np * 16 + layout::ldm_b_row(lane)) * kStride + kk * 16 +
                            layout::ldm_b_col(lane));
        ptx::mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
        ptx::mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Scale into the log2 domain; mask keys past Sk and above the diagonal.
    const bool need_mask = layout::tile_needs_mask(m0, n0, kBc, si.sq, si.sk, kCausal);
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        s[j][r] *= scale_log2;
        if (need_mask) {
          const int col = n0 + j * 8 + layout::c_col(lane, r);
          const int64_t row = m0 + wrow + layout::c_row(lane, r);
          if (!layout::visible(row, col, si.sq, si.sk, kCausal)) s[j][r] = -kInf;
        }
      }

    // Online softmax: new row max, rescale what was accumulated, P = exp2(S - max).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = row_max[i];
#pragma unroll
      for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      mx = quad_max(mx);
      // A row that has seen no key yet keeps max -inf; subtract 0 instead so that
      // exp2(-inf - m) is 0, never NaN.
      const float m_use = mx == -kInf ? 0.0f : mx;
      const float corr = exp2f(row_max[i] - m_use);  // 0 when row_max was -inf
      row_max[i] = mx;
      row_sum[i] *= corr;
#pragma unroll
      for (int j = 0; j < kDT; ++j) {
        acc[j][2 * i] *= corr;
        acc[j][2 * i + 1] *= corr;
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        s[j][2 * i] = exp2f(s[j][2 * i] - m_use);
        s[j][2 * i + 1] = exp2f(s[j][2 * i + 1] - m_use);
        row_sum[i] += s[j][2 * i] + s[j][2 * i + 1];
      }
    }

    ptx::cp_async_wait<0>();
    __syncthreads();  // V_nt landed; every warp is done reading K_nt
    if (nt + 1 < n_tiles)
      load_tile<kBc, D, kThreads>(sK, k + (n0 + kBc) * p.k_row_stride, p.k_row_stride,
                                  si.sk - n0 - kBc, k_base, tid);
    ptx::cp_async_commit();

    // O += P V: P (16 x kBc) from registers, V [kBc][D] by ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ptx::ldmatrix_x4_trans(bv, sV + (kk * 16 + layout::ldm_a_row(lane)) * kStride + dp * 16 +
                                  layout::ldm_a_col(lane));
        ptx::mma_16816<T>(acc[2 * dp], a, bv[0], bv[1]);
        ptx::mma_16816<T>(acc[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
  }

  // Finalise: O / l and lse = (max + log2 l) ln 2; a row that saw no key: 0 and -inf.
  float inv[2], lse[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // l is NaN when the row saw a NaN score: out and lse are NaN then, as on the CPU.
    const float l = quad_sum(row_sum[i]);
    inv[i] = l != 0.0f ? 1.0f / l : 0.0f;
    lse[i] = l != 0.0f ? (row_max[i] + log2f(l)) * kLn2 : -kInf;
  }

  // Stage the warp's 16 output rows in its own Q rows (only this warp reads them), then
  // store 16-byte chunks of whole rows. Those rows were copied by threads of every warp
  // (load_tile spreads the chunks over the CTA) and wait_group waits only for the calling
  // thread's copies: without a key tile (n_tiles == 0, no barrier in the loop) another
  // warp's late Q copy could land on the staged output. A CTA barrier after the wait
  // orders every copy before the first staging store.
  ptx::cp_async_wait<0>();
  __syncthreads();
  T* so = sQ + wrow * kStride;
#pragma unroll
  for (int j = 0; j < kDT; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = layout::c_row(lane, 2 * i), c = j * 8 + layout::c_col(lane, 2 * i);
      *reinterpret_cast<uint32_t*>(so + r * kStride + c) =
          pack2<T>(acc[j][2 * i] * inv[i], acc[j][2 * i + 1] * inv[i]);
    }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + (si.q_off + m0 + wrow) * p.o_row_stride +
           h * p.o_head_stride;
  const int rows_left = si.sq - m0 - wrow;  // rows of this warp inside the sequence
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int idx = lane; idx < 16 * kChunksPerRow; idx += 32) {
    const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
    if (r < rows_left)
      *reinterpret_cast<uint4*>(out + r * p.o_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(so + r * kStride + c * 8);
  }
  if (lane % 4 == 0) {
    float* lse_out = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + si.q_off + m0 + wrow;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = layout::c_row(lane, 2 * i);
      if (r < rows_left) lse_out[r] = lse[i];
    }
  }
}

template <typename T, int D>
cudaError_t run_flash_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D>;
  if (p.head_dim != D) return cudaErrorInvalidValue;
  const int64_t m_blocks = (static_cast<int64_t>(p.seqlen_q) + Tr::kBr - 1) / Tr::kBr;
  if (m_blocks == 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  if (m_blocks > 0x7fffffff || p.batch > 65535 || p.heads > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(m_blocks), p.batch, p.heads);
  return LLMCORE_BOOL_SWITCH(p.causal, kCausal, [&] {
    auto kernel = flash_fwd_kernel<T, D, kCausal>;
    cudaError_t err = set_smem(kernel, Tr::kSmemBytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attention
}  // namespace llmcore
