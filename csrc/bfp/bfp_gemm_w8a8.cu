// BFP x BFP GEMM on int8 tensor cores: y [M, N] = A [M, K] (x) B [N, K]^T (+ bias).
//
// Shapes: A and B int8 mantissas (mantissa_bits 5..8, unpacked), row strides multiples of
// 16 bytes; exponents uint8 [M, ceil(K/B)] and [N, ceil(K/B)] (E8M0, 255 = NaN block);
// block size B = 32 or 16 (the same for both operands); bias fp32 [N] or null; y
// fp32/bf16/fp16 [M, N].
//
// Semantics (docs/bfp.md): for every K block the integer dot product of the mantissas is
// exact in int32; it is scaled by 2^(ea-127-(a_bits-2)) * 2^(eb-127-(b_bits-2)) and
// accumulated in fp32 (a NaN exponent makes the block's scale NaN).
//
// Algorithm.
//  - CTA tile 128 x 128, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 MMA tiles.
//  - K in stages of 64 bytes, double-buffered in shared memory by cp.async (16-byte
//    copies; rows past M/N and bytes past K are zero-filled through cp.async's src-size,
//    never read). Shared rows are padded to 80 bytes so the 32-bit fragment loads of a
//    warp hit 32 distinct banks. The block scales of the next stage are fetched into
//    registers while the current stage computes and stored to shared memory after it.
//  - B = 32: one mma.sync.m16n8k32.s8 per block and tile; B = 16: one m16n8k16.s8. Each
//    MMA starts from C = 0x4B400000 (the float 1.5 * 2^23), so the int32 result read as
//    fp32 is exactly 12582912 + dot (|dot| <= 32 * 128 * 128 = 2^19 < 2^22): one FADD
//    converts it, no I2F; one FMA by sa * sb accumulates it.
//  - Fragment layouts (PTX ISA, mma.m16n8k32 .s8; g = lane / 4, t = lane % 4):
//      A: a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
//      B: b0 = B[n=g][k=4t..4t+3], b1 = B[n=g][k=16+4t..]      (B stored [N, K])
//      C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
//    m16n8k16 .s8: a0 = A[g][4t..], a1 = A[g+8][4t..], b0 = B[n=g][k=4t..], C the same.
//
// Compile alone: nvcc -std=c++17 -O3 -Icsrc -c csrc/bfp/bfp_gemm_w8a8.cu
//   -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
#include "bfp/bfp_cuda_common.cuh"

namespace llmcore {
namespace bfp {
namespace cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kThreads = 256;
constexpr int kRow = kBK + 16;  // padded shared row, bytes
constexpr uint32_t kNoScale = 0x100u;  // "outside the matrix": scale 0

constexpr uint32_t kMmaBias = 0x4B400000u;  // the float 1.5 * 2^23: C of every MMA

__device__ __forceinline__ uint32_t lds32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <int BLOCK>
struct Smem {
  static constexpr int kBlocks = kBK / BLOCK;  // K blocks per stage
  alignas(16) int8_t a[2][kBM][kRow];
  alignas(16) int8_t b[2][kBN][kRow];
  float sa[2][kBlocks][kBM];
  float sb[2][kBlocks][kBN];
};

template <int BLOCK>
__global__ void __launch_bounds__(kThreads)
gemm_int8_kernel(const int8_t* __restrict__ a, int64_t lda, const uint8_t* __restrict__ a_exp,
                 int64_t ldae, const int8_t* __restrict__ b, int64_t ldb,
                 const uint8_t* __restrict__ b_exp, int64_t ldbe, int64_t m, int64_t n, int64_t k,
                 int a_bits, int b_bits, const float* __restrict__ bias, void* __restrict__ y,
                 DType ytype, int64_t ldy) {
  constexpr int kBlocks = Smem<BLOCK>::kBlocks;
  constexpr int kExpPerThread = kBlocks * kBM / kThreads;  // 1 (B=32) or 2 (B=16)
  static_assert(kBM == kBN && kExpPerThread * kThreads == kBlocks * kBM, "exponent staging");
  __shared__ Smem<BLOCK> sm;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile origin: (64 wm, 32 wn)
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t nb = (k + BLOCK - 1) / BLOCK;
  const int nkt = static_cast<int>((k + kBK - 1) / kBK);

  auto load_tiles = [&](int kt, int buf) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 128 rows x 4 chunks of 16 bytes, per operand
      const int idx = tid + i * kThreads;
      const int row = idx >> 2, ch = idx & 3;
      const int64_t gk = static_cast<int64_t>(kt) * kBK + ch * 16;
      const int64_t left = k - gk;
      const int kbytes = left <= 0 ? 0 : (left >= 16 ? 16 : static_cast<int>(left));
      const int64_t ra = m0 + row, rb = n0 + row;
      const int na = ra < m ? kbytes : 0, nbb = rb < n ? kbytes : 0;
      ptx::cp_async_16(&sm.a[buf][row][ch * 16], na ? a + ra * lda + gk : a, na);
      ptx::cp_async_16(&sm.b[buf][row][ch * 16], nbb ? b + rb * ldb + gk : b, nbb);
    }
  };
  auto fetch_exps = [&](int kt, uint32_t (&ea)[kExpPerThread], uint32_t (&eb)[kExpPerThread]) {
#pragma unroll
    for (int i = 0; i < kExpPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const int row = idx % kBM, blk = idx / kBM;
      const int64_t kb = static_cast<int64_t>(kt) * kBlocks + blk;
      const int64_t ra = m0 + row, rb = n0 + row;
      ea[i] = (ra < m && kb < nb) ? a_exp[ra * ldae + kb] : kNoScale;
      eb[i] = (rb < n && kb < nb) ? b_exp[rb * ldbe + kb] : kNoScale;
    }
  };
  auto store_exps = [&](int buf, const uint32_t (&ea)[kExpPerThread], const uint32_t (&eb)[kExpPerThread]) {
#pragma unroll
    for (int i = 0; i < kExpPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const int row = idx % kBM, blk = idx / kBM;
      sm.sa[buf][blk][row] = ea[i] == kNoScale ? 0.0f : scale_of(static_cast<uint8_t>(ea[i]), a_bits);
      sm.sb[buf][blk][row] = eb[i] == kNoScale ? 0.0f : scale_of(static_cast<uint8_t>(eb[i]), b_bits);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  uint32_t ea[kExpPerThread], eb[kExpPerThread];
  if (nkt > 0) {
    load_tiles(0, 0);
    fetch_exps(0, ea, eb);
    store_exps(0, ea, eb);
  }
  ptx::cp_async_commit();

  for (int kt = 0; kt < nkt; ++kt) {
    const int buf = kt & 1;
    const bool more = kt + 1 < nkt;
    if (more) {
      load_tiles(kt + 1, buf ^ 1);
      fetch_exps(kt + 1, ea, eb);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // stage kt has landed
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < kBlocks; ++kk) {
      const int kc = kk * BLOCK + 4 * t;  // this thread's first byte of the block
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int r = wm * 64 + mt * 16 + g;
        af[mt][0] = lds32(&sm.a[buf][r][kc]);
        af[mt][1] = lds32(&sm.a[buf][r + 8][kc]);
        if (BLOCK == 32) {
          af[mt][2] = lds32(&sm.a[buf][r][kc + 16]);
          af[mt][3] = lds32(&sm.a[buf][r + 8][kc + 16]);
        } else {
          af[mt][2] = af[mt][3] = 0u;
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c = wn * 32 + nt * 8 + g;
        bf[nt][0] = lds32(&sm.b[buf][c][kc]);
        bf[nt][1] = BLOCK == 32 ? lds32(&sm.b[buf][c][kc + 16]) : 0u;
      }
      float sa[4][2], sb[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        sa[mt][0] = sm.sa[buf][kk][wm * 64 + mt * 16 + g];
        sa[mt][1] = sm.sa[buf][kk][wm * 64 + mt * 16 + g + 8];
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        sb[nt][0] = sm.sb[buf][kk][wn * 32 + nt * 8 + 2 * t];
        sb[nt][1] = sm.sb[buf][kk][wn * 32 + nt * 8 + 2 * t + 1];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          int d[4];
          if (BLOCK == 32) ptx::mma_16832_s8(d, af[mt], bf[nt], kMmaBias);
          else ptx::mma_16816_s8(d, af[mt], bf[nt], kMmaBias);
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float dot = __int_as_float(d[r]) - 12582912.0f;  // exact
            const float s = mul_noftz(sa[mt][r >> 1], sb[nt][r & 1]);
            acc[mt][nt][r] = fmaf(dot, s, acc[mt][nt][r]);
          }
        }
      }
    }

    if (more) store_exps(buf ^ 1, ea, eb);
    __syncthreads();  // stage buf consumed before it is refilled; next scales visible
  }

#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t row = m0 + wm * 64 + mt * 16 + g + 8 * (r >> 1);
        const int64_t col = n0 + wn * 32 + nt * 8 + 2 * t + (r & 1);
        if (row < m && col < n) {
          const float v = acc[mt][nt][r] + (bias != nullptr ? bias[col] : 0.0f);
          store_float(y, ytype, row * ldy + col, v);
        }
      }
    }
  }
}

}  // namespace

cudaError_t gemm_int8(const int8_t* a, int64_t lda, const uint8_t* a_exp, int64_t ldae,
                      const int8_t* b, int64_t ldb, const uint8_t* b_exp, int64_t ldbe,
                      int64_t m, int64_t n, int64_t k, int a_bits, int b_bits, int block,
                      const float* bias_f32, void* y, DType ytype, int64_t ldy,
                      cudaStream_t stream) {
  if (!gemm_int8_supported(a_bits, b_bits, block) || m < 0 || n < 0 || k < 0)
    return cudaErrorInvalidValue;
  if (lda % 16 != 0 || ldb % 16 != 0 || reinterpret_cast<uintptr_t>(a) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(b) % 16 != 0)
    return cudaErrorInvalidValue;
  if (m == 0 || n == 0) return cudaSuccess;
  const int64_t gx = ceil_div(n, kBN), gy = ceil_div(m, kBM);
  if (gx > 0x7fffffff || gy > 65535 || ceil_div(k, kBK) > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (block == 32)
    gemm_int8_kernel<32><<<grid, kThreads, 0, stream>>>(a, lda, a_exp, ldae, b, ldb, b_exp, ldbe,
                                                       m, n, k, a_bits, b_bits, bias_f32, y,
                                                       ytype, ldy);
  else
    gemm_int8_kernel<16><<<grid, kThreads, 0, stream>>>(a, lda, a_exp, ldae, b, ldb, b_exp, ldbe,
                                                       m, n, k, a_bits, b_bits, bias_f32, y,
                                                       ytype, ldy);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bfp
}  // namespace llmcore
