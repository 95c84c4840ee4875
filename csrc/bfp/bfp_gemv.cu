// Weight-only BFP linear for small M (decode): y [M, N] = x [M, K] @ dequant(W)[N, K]^T + b.
//
// Shapes: x fp32/bf16/fp16 [M, K] with 1 <= M <= 16; W mantissas int8 [N, K] (or packed
// nibbles uint8 [N, ceil(K/2)] for mantissa_bits <= 4), exponents uint8 [N, ceil(K/B)];
// bias [N] and y [M, N] in x's dtype. fp32 accumulation.
//
// Algorithm. Memory bound: the kernel's job is to stream W (8.25 bits per weight for
// MXINT8) at HBM speed and do everything else in registers.
//  - A CTA of 8 warps owns 16 consecutive output columns; each warp owns 2 of them and
//    keeps fp32 accumulators acc[MT][2] per lane (MT = 1, 4 or 16 >= M, a template).
//  - x is staged in shared memory as fp32, K in chunks of at most 32 KB (8192/MT
//    columns), zero beyond K and beyond M. Within each 512-column piece the layout is
//    permuted so that the float4 loads below are conflict-free.
//  - Each lane takes 16 consecutive K elements of its two weight rows per step (a warp:
//    512 elements): one 16-byte load per row (8 bytes when packed), issued one step ahead
//    of its use. Rows that are not 16-byte (8-byte) aligned, and the K tail, are read byte
//    by byte; nothing past K (or ceil(K/2) bytes) is ever read.
//  - Dequantise in registers without I2F: bytes go to offset binary and are spliced
//    into the float 2^23 + u with one PRMT, then one FADD removes the offset, one FMUL
//    applies the block scale. Block sizes that are multiples of 16 need one scale per
//    step; any other block size (1..1024) walks the block boundaries element by element.
//  - Then M x 16 FMAs per row and step; at the end xor shuffles reduce each accumulator
//    over the warp and lane 0 adds the bias and stores.
//
// Compile alone: nvcc -std=c++17 -O3 -Icsrc -c csrc/bfp/bfp_gemv.cu
//   -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
#include "bfp/bfp_cuda_common.cuh"

namespace llmcore {
namespace bfp {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kCols = 2;                 // output columns per warp
constexpr int kStep = 16;                // K elements per lane per step
constexpr int kPiece = 32 * kStep;       // K elements per warp per step
constexpr int kSmemFloats = 8192;        // 32 KB of x per CTA

// Position of element e (relative to the chunk start) in the staged x: lane L reads
// elements [16L, 16L+16) of each 512-piece as four float4, the q-th of which sits at
// q*128 + 4L, so the 32 lanes of one float4 load touch 512 consecutive bytes.
__device__ __forceinline__ int staged_pos(int e) {
  const int r = e & (kPiece - 1);
  return (e - r) + ((r >> 2) & 3) * 128 + (r >> 4) * 4 + (r & 3);
}

// The raw bytes of elements [c, c+16) of one weight row, zero past the row's end.
template <bool PACKED>
__device__ __forceinline__ uint4 load_raw(const uint8_t* __restrict__ wr, int64_t c, int64_t k,
                                          bool vec_ok) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  if (PACKED) {
    const int64_t b0 = c >> 1, nbytes = (k + 1) >> 1;
    if (vec_ok && c + kStep <= k) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(wr + b0));
      r.x = v.x;
      r.y = v.y;
    } else {
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (b0 + i < nbytes) w[i >> 2] |= static_cast<uint32_t>(wr[b0 + i]) << (8 * (i & 3));
      r.x = w[0];
      r.y = w[1];
    }
  } else {
    if (vec_ok && c + kStep <= k) {
      r = __ldg(reinterpret_cast<const uint4*>(wr + c));
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int i = 0; i < 16; ++i)
        if (c + i < k) w[i >> 2] |= static_cast<uint32_t>(wr[c + i]) << (8 * (i & 3));
      r = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  return r;
}

// Integer values of the 16 elements of a raw step, as floats (exact).
template <bool PACKED>
__device__ __forceinline__ void unpack_raw(const uint4& r, float (&v)[kStep]) {
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
  if (PACKED) {
    // element 8*wi + 2*i + h: nibble h of byte i of word wi; n ^ 8 = value + 8
#pragma unroll
    for (int wi = 0; wi < 2; ++wi) {
      const uint32_t lo = (words[wi] & 0x0f0f0f0fu) ^ 0x08080808u;
      const uint32_t hi = ((words[wi] >> 4) & 0x0f0f0f0fu) ^ 0x08080808u;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[8 * wi + 2 * i] = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7440u + i)) - 8388616.0f;
        v[8 * wi + 2 * i + 1] = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7440u + i)) - 8388616.0f;
      }
    }
  } else {
    // element 4*wi + i: byte i of word wi; b ^ 0x80 = value + 128
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      const uint32_t u = words[wi] ^ 0x80808080u;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        v[4 * wi + i] = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440u + i)) - 8388736.0f;
    }
  }
}

__device__ __forceinline__ float scale_or_zero(const uint8_t* __restrict__ er, int64_t kb,
                                               int64_t nb, int bits) {
  return kb < nb ? scale_of(__ldg(er + kb), bits) : 0.0f;
}

// Dequantised weights of elements [c, c+16) of one row.
template <bool PACKED>
__device__ __forceinline__ void dequant_step(const uint4& raw, const uint8_t* __restrict__ er,
                                             int64_t c, int64_t nb, int bits, int block,
                                             float (&wf)[kStep]) {
  unpack_raw<PACKED>(raw, wf);
  int64_t kb = c / block;
  if (block % kStep == 0) {  // c is a multiple of 16: the whole step is in block kb
    const float s = scale_or_zero(er, kb, nb, bits);
#pragma unroll
    for (int j = 0; j < kStep; ++j) wf[j] *= s;
  } else {
    int rem = static_cast<int>(c - kb * block);
    float s = scale_or_zero(er, kb, nb, bits);
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      if (rem == block) {
        ++kb;
        rem = 0;
        s = scale_or_zero(er, kb, nb, bits);
      }
      wf[j] *= s;
      ++rem;
    }
  }
}

template <int MT, bool PACKED>
__global__ void __launch_bounds__(kThreads)
linear_small_m_kernel(const void* __restrict__ x, DType xtype, int m, int64_t k, int64_t ldx,
                      const uint8_t* __restrict__ w, int64_t ldw, const uint8_t* __restrict__ we,
                      int64_t lde, int64_t n, int bits, int block, const void* __restrict__ bias,
                      void* __restrict__ y, int64_t ldy, int kc, bool vec_ok) {
  extern __shared__ float xs[];  // [MT][kc], staged_pos layout
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kCols;
  const int64_t nb = (k + block - 1) / block;

  const uint8_t* wr[kCols];
  const uint8_t* er[kCols];
  bool col_ok[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    col_ok[j] = n0 + j < n;
    wr[j] = w + (col_ok[j] ? n0 + j : 0) * ldw;
    er[j] = we + (col_ok[j] ? n0 + j : 0) * lde;
  }

  float acc[MT][kCols];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm)
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[mm][j] = 0.0f;

  for (int64_t kc0 = 0; kc0 < k; kc0 += kc) {
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < MT * kc; i += kThreads) {
      const int mm = i / kc, e = i - mm * kc;
      const int64_t c = kc0 + e;
      xs[mm * kc + staged_pos(e)] = (mm < m && c < k) ? load_float(x, xtype, mm * ldx + c) : 0.0f;
    }
    __syncthreads();

    const int64_t kend = kc0 + kc < k ? kc0 + kc : k;
    int64_t c = kc0 + lane * kStep;
    uint4 cur[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j)
      cur[j] = (col_ok[j] && c < kend) ? load_raw<PACKED>(wr[j], c, k, vec_ok) : make_uint4(0u, 0u, 0u, 0u);
    for (; c < kend; c += kPiece) {
      uint4 nxt[kCols];
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        nxt[j] = (col_ok[j] && c + kPiece < kend) ? load_raw<PACKED>(wr[j], c + kPiece, k, vec_ok)
                                                  : make_uint4(0u, 0u, 0u, 0u);
      float wf[kCols][kStep];
#pragma unroll
      for (int j = 0; j < kCols; ++j) dequant_step<PACKED>(cur[j], er[j], c, nb, bits, block, wf[j]);
      const int base = static_cast<int>(c - kc0) - lane * kStep + lane * 4;  // piece start + 4L
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) {
        if (mm < m) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float4 xv = *reinterpret_cast<const float4*>(&xs[mm * kc + base + q * 128]);
#pragma unroll
            for (int j = 0; j < kCols; ++j) {
              acc[mm][j] = fmaf(xv.x, wf[j][4 * q + 0], acc[mm][j]);
              acc[mm][j] = fmaf(xv.y, wf[j][4 * q + 1], acc[mm][j]);
              acc[mm][j] = fmaf(xv.z, wf[j][4 * q + 2], acc[mm][j]);
              acc[mm][j] = fmaf(xv.w, wf[j][4 * q + 3], acc[mm][j]);
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kCols; ++j) cur[j] = nxt[j];
    }
  }

#pragma unroll
  for (int mm = 0; mm < MT; ++mm) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      float v = acc[mm][j];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && mm < m && col_ok[j]) {
        if (bias != nullptr) v += load_float(bias, xtype, n0 + j);
        store_float(y, xtype, mm * ldy + n0 + j, v);
      }
    }
  }
}

template <int MT, bool PACKED>
cudaError_t launch(const void* x, DType xtype, int64_t m, int64_t k, int64_t ldx,
                   const uint8_t* w, int64_t ldw, const uint8_t* we, int64_t lde, int64_t n,
                   int bits, int block, const void* bias, void* y, int64_t ldy, bool vec_ok,
                   cudaStream_t stream) {
  const int64_t k_round = (k + kPiece - 1) / kPiece * kPiece;
  const int kc = static_cast<int>(k_round < kSmemFloats / MT ? k_round : kSmemFloats / MT);
  const int64_t grid = ceil_div(n, kWarps * kCols);
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(MT) * kc * sizeof(float);  // <= 32 KB
  linear_small_m_kernel<MT, PACKED><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(
      x, xtype, static_cast<int>(m), k, ldx, w, ldw, we, lde, n, bits, block, bias, y, ldy, kc,
      vec_ok);
  return cudaGetLastError();
}

template <bool PACKED>
cudaError_t launch_m(const void* x, DType xtype, int64_t m, int64_t k, int64_t ldx,
                     const uint8_t* w, int64_t ldw, const uint8_t* we, int64_t lde, int64_t n,
                     int bits, int block, const void* bias, void* y, int64_t ldy, bool vec_ok,
                     cudaStream_t stream) {
  if (m == 1)
    return launch<1, PACKED>(x, xtype, m, k, ldx, w, ldw, we, lde, n, bits, block, bias, y, ldy,
                             vec_ok, stream);
  if (m <= 4)
    return launch<4, PACKED>(x, xtype, m, k, ldx, w, ldw, we, lde, n, bits, block, bias, y, ldy,
                             vec_ok, stream);
  return launch<16, PACKED>(x, xtype, m, k, ldx, w, ldw, we, lde, n, bits, block, bias, y, ldy,
                            vec_ok, stream);
}

}  // namespace

cudaError_t linear_small_m(const void* x, DType xtype, int64_t m, int64_t k, int64_t ldx,
                           const void* w_mantissa, int64_t ldw, const uint8_t* w_exponent,
                           int64_t lde, int64_t n, int bits, int block, const void* bias,
                           void* y, int64_t ldy, cudaStream_t stream) {
  if (!valid_format(bits, block) || m < 1 || m > kSmallMMax || k < 0 || n < 0)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  // k == 0 still runs: y = bias (or 0).
  const auto* w = static_cast<const uint8_t*>(w_mantissa);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(w);
  if (is_packed(bits)) {
    const bool vec_ok = ldw % 8 == 0 && addr % 8 == 0;
    return launch_m<true>(x, xtype, m, k, ldx, w, ldw, w_exponent, lde, n, bits, block, bias, y,
                          ldy, vec_ok, stream);
  }
  const bool vec_ok = ldw % 16 == 0 && addr % 16 == 0;
  return launch_m<false>(x, xtype, m, k, ldx, w, ldw, w_exponent, lde, n, bits, block, bias, y,
                         ldy, vec_ok, stream);
}

}  // namespace cuda
}  // namespace bfp
}  // namespace llmcore
