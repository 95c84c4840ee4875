// CPU stand-ins for the CUDA runtime calls of llmcore_cuda_selftest and for llmcore's CUDA
// launchers (plain loops in double, the launchers' contracts read from their headers: strides,
// varlen tables, bottom-right causal, GQA, paged caches with absent pages, MXINT8 blocks), so
// that the self-test's host side runs on a CPU (ctest: llmcore_cuda_selftest_mock). The
// numbers it prints say nothing about the CUDA kernels: only that the self-test's inputs,
// references and rules agree with an independent reading of the same contracts.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "cuda_runtime.h"
#include "attention/attention_cuda.cuh"
#include "bfp/bfp_cpu.h"
#include "bfp/bfp_cuda.cuh"
#include "common/half_convert.h"
#include "decode/decode_cuda.cuh"

using llmcore::DType;
cudaError_t cudaMalloc(void** p, size_t n) { *p = std::malloc(n ? n : 1); return cudaSuccess; }
cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return cudaSuccess; }
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t) { return cudaMemcpy(d, s, n, k); }
cudaError_t cudaMemset(void* d, int v, size_t n) { std::memset(d, v, n); return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) { return cudaMemset(d, v, n); }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) { std::strcpy(p->name, "mock"); p->major = 9; p->minor = 0; p->multiProcessorCount = 132; p->l2CacheSize = 1; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int* v) { *v = 0; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaErrorInvalidValue ? "invalid argument" : "error"; }
struct CUevent_st { std::chrono::steady_clock::time_point t; };
cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new CUevent_st; return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) { e->t = std::chrono::steady_clock::now(); return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) { *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count() + 1e-3f; return cudaSuccess; }

namespace {
double ld(DType t, const void* p, int64_t i) {
  if (t == DType::kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == DType::kFloat16 ? llmcore::f16_to_f32(h) : llmcore::bf16_to_f32(h);
}
void st(DType t, void* p, int64_t i, double v) {
  if (t == DType::kFloat32) { static_cast<float*>(p)[i] = float(v); return; }
  static_cast<uint16_t*>(p)[i] = t == DType::kFloat16 ? llmcore::f32_to_f16(float(v)) : llmcore::f32_to_bf16(float(v));
}
}  // namespace

namespace llmcore { namespace bfp { namespace cuda {
cudaError_t quantize(const void* x, DType xt, int64_t rows, int64_t k, int64_t ldx, int bits, int block, bool even, void* m, int64_t ldm, uint8_t* e, int64_t lde, cudaStream_t) {
  cpu::quantize_rows(x, xt, ldx, k, bits, block, even, static_cast<uint8_t*>(m), ldm, e, lde, 0, rows);
  return cudaSuccess;
}
cudaError_t linear_small_m(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx, const void* wm, int64_t ldw, const uint8_t* we, int64_t lde, int64_t n, int bits, int block, const void* bias, void* y, int64_t ldy, cudaStream_t) {
  std::vector<float> w(size_t(n) * k);
  cpu::dequantize_rows(static_cast<const uint8_t*>(wm), ldw, we, lde, k, bits, block, w.data(), DType::kFloat32, k, 0, n);
  for (int64_t i = 0; i < m; ++i) for (int64_t j = 0; j < n; ++j) {
    double acc = bias ? ld(xt, bias, j) : 0;
    for (int64_t c = 0; c < k; ++c) acc += ld(xt, x, i * ldx + c) * w[j * k + c];
    st(xt, y, i * ldy + j, acc);
  }
  return cudaSuccess;
}
cudaError_t gemm_int8(const int8_t* a, int64_t lda, const uint8_t* ae, int64_t ldae, const int8_t* b, int64_t ldb, const uint8_t* be, int64_t ldbe, int64_t m, int64_t n, int64_t k, int ab, int bb, int block, const float* bias, void* y, DType yt, int64_t ldy, cudaStream_t) {
  std::vector<float> A(size_t(m) * k), B(size_t(n) * k);
  cpu::dequantize_rows(reinterpret_cast<const uint8_t*>(a), lda, ae, ldae, k, ab, block, A.data(), DType::kFloat32, k, 0, m);
  cpu::dequantize_rows(reinterpret_cast<const uint8_t*>(b), ldb, be, ldbe, k, bb, block, B.data(), DType::kFloat32, k, 0, n);
  for (int64_t i = 0; i < m; ++i) for (int64_t j = 0; j < n; ++j) {
    double acc = bias ? bias[j] : 0;
    for (int64_t c = 0; c < k; ++c) acc += double(A[i * k + c]) * B[j * k + c];
    st(yt, y, i * ldy + j, acc);
  }
  return cudaSuccess;
}
}}}  // namespace llmcore::bfp::cuda

namespace llmcore { namespace attention { namespace cuda {
namespace {
struct Seq { int64_t q0, k0; int sq, sk; };
Seq seq(const FwdParams& p, int b) {
  if (p.cu_seqlens_q) return {p.cu_seqlens_q[b], p.cu_seqlens_k[b], p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b], p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]};
  return {0, 0, p.seqlen_q, p.seqlen_k};
}
// P[i][j] (0 where masked) for (b, h)
std::vector<double> probs(const FwdParams& p, int b, int h, const Seq& s, std::vector<double>& lse) {
  const int hk = h / (p.heads / p.kv_heads), d = p.head_dim;
  std::vector<double> P(size_t(s.sq) * s.sk, 0.0);
  lse.assign(s.sq, -INFINITY);
  for (int i = 0; i < s.sq; ++i) {
    const int last = p.causal ? std::min(s.sk - 1, i + s.sk - s.sq) : s.sk - 1;
    if (last < 0) continue;
    double mx = -INFINITY;
    for (int j = 0; j <= last; ++j) {
      double acc = 0;
      for (int c = 0; c < d; ++c) acc += ld(p.dtype, p.q, b * p.q_batch_stride + (s.q0 + i) * p.q_row_stride + h * p.q_head_stride + c) * ld(p.dtype, p.k, b * p.k_batch_stride + (s.k0 + j) * p.k_row_stride + hk * p.k_head_stride + c);
      P[size_t(i) * s.sk + j] = acc * p.scale;
      mx = std::max(mx, acc * p.scale);
    }
    double sum = 0;
    for (int j = 0; j <= last; ++j) sum += std::exp(P[size_t(i) * s.sk + j] - mx);
    lse[i] = mx + std::log(sum);
    for (int j = 0; j <= last; ++j) P[size_t(i) * s.sk + j] = std::exp(P[size_t(i) * s.sk + j] - lse[i]);
  }
  return P;
}
}  // namespace
cudaError_t attention_fwd(const FwdParams& p, cudaStream_t) {
  const int d = p.head_dim;
  for (int b = 0; b < p.batch; ++b) {
    const Seq s = seq(p, b);
    for (int h = 0; h < p.heads; ++h) {
      const int hk = h / (p.heads / p.kv_heads);
      std::vector<double> lse;
      const auto P = probs(p, b, h, s, lse);
      for (int i = 0; i < s.sq; ++i) {
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + s.q0 + i] = float(lse[i]);
        for (int c = 0; c < d; ++c) {
          double acc = 0;
          for (int j = 0; j < s.sk; ++j) if (P[size_t(i) * s.sk + j] != 0) acc += P[size_t(i) * s.sk + j] * ld(p.dtype, p.v, b * p.v_batch_stride + (s.k0 + j) * p.v_row_stride + hk * p.v_head_stride + c);
          st(p.dtype, p.out, b * p.o_batch_stride + (s.q0 + i) * p.o_row_stride + h * p.o_head_stride + c, acc);
        }
      }
    }
  }
  return cudaSuccess;
}
cudaError_t attention_bwd(const BwdParams& p, cudaStream_t) {
  const int d = p.head_dim, g = p.heads / p.kv_heads;
  for (int b = 0; b < p.batch; ++b) {
    const Seq s = seq(p, b);
    std::vector<double> dk(size_t(s.sk) * p.kv_heads * d, 0.0), dv(dk.size(), 0.0);
    for (int h = 0; h < p.heads; ++h) {
      const int hk = h / g;
      std::vector<double> lse;
      const auto P = probs(p, b, h, s, lse);
      auto Q = [&](int i, int c) { return ld(p.dtype, p.q, b * p.q_batch_stride + (s.q0 + i) * p.q_row_stride + h * p.q_head_stride + c); };
      auto K = [&](int j, int c) { return ld(p.dtype, p.k, b * p.k_batch_stride + (s.k0 + j) * p.k_row_stride + hk * p.k_head_stride + c); };
      auto V = [&](int j, int c) { return ld(p.dtype, p.v, b * p.v_batch_stride + (s.k0 + j) * p.v_row_stride + hk * p.v_head_stride + c); };
      auto G = [&](int i, int c) { return ld(p.dtype, p.dout, b * p.do_batch_stride + (s.q0 + i) * p.do_row_stride + h * p.do_head_stride + c); };
      for (int i = 0; i < s.sq; ++i) {
        std::vector<double> o(d, 0.0), dp(s.sk, 0.0), dq(d, 0.0);
        for (int j = 0; j < s.sk; ++j) for (int c = 0; c < d; ++c) { o[c] += P[size_t(i) * s.sk + j] * V(j, c); dp[j] += G(i, c) * V(j, c); }
        double delta = 0;
        for (int c = 0; c < d; ++c) delta += G(i, c) * o[c];
        for (int j = 0; j < s.sk; ++j) {
          const double pij = P[size_t(i) * s.sk + j];
          if (pij == 0) continue;
          const double ds = pij * (dp[j] - delta) * p.scale;
          for (int c = 0; c < d; ++c) {
            dq[c] += ds * K(j, c);
            dk[(size_t(j) * p.kv_heads + hk) * d + c] += ds * Q(i, c);
            dv[(size_t(j) * p.kv_heads + hk) * d + c] += pij * G(i, c);
          }
        }
        for (int c = 0; c < d; ++c) st(p.dtype, p.dq, b * p.dq_batch_stride + (s.q0 + i) * p.dq_row_stride + h * p.dq_head_stride + c, dq[c]);
      }
    }
    for (int j = 0; j < s.sk; ++j) for (int hk = 0; hk < p.kv_heads; ++hk) for (int c = 0; c < d; ++c) {
      st(p.dtype, p.dk, b * p.dk_batch_stride + (s.k0 + j) * p.dk_row_stride + hk * p.dk_head_stride + c, dk[(size_t(j) * p.kv_heads + hk) * d + c]);
      st(p.dtype, p.dv, b * p.dv_batch_stride + (s.k0 + j) * p.dv_row_stride + hk * p.dv_head_stride + c, dv[(size_t(j) * p.kv_heads + hk) * d + c]);
    }
  }
  return cudaSuccess;
}
}}}  // namespace llmcore::attention::cuda

namespace llmcore { namespace decode { namespace cuda {
namespace {
bool locate(const CacheGeometry& g, int b, int64_t pos, int64_t& i0, int64_t& i1) {
  if (pos < 0 || pos >= cache_capacity(g)) return false;
  if (!g.block_table) { i0 = b; i1 = pos; return b < g.dim0; }
  const int32_t id = g.block_table[b * g.bt_stride + pos / g.dim1];
  if (id < 0 || id >= g.dim0) return false;
  i0 = id; i1 = pos % g.dim1;
  return true;
}
}  // namespace
int decode_attention_num_splits(const DecodeAttentionParams&, int) { return 3; }
cudaError_t decode_attention(const DecodeAttentionParams& p, cudaStream_t) {
  const int d = p.head_dim, g = p.heads / p.kv_heads;
  auto row = [&](const void* cache, const uint8_t* ex, const Strides3& s, const Strides3& es, int64_t i0, int64_t i1, int hk, int c) -> double {
    if (!p.int8_cache) return ld(p.dtype, cache, i0 * s.s0 + i1 * s.s1 + hk * s.s2 + c);
    const int8_t m = static_cast<const int8_t*>(cache)[i0 * s.s0 + i1 * s.s1 + hk * s.s2 + c];
    const int e = ex[i0 * es.s0 + i1 * es.s1 + hk * es.s2 + c / 32];
    return std::ldexp(double(m), e - 127 - 6);
  };
  for (int b = 0; b < p.batch; ++b) {
    const int64_t len = std::min<int64_t>(std::max(p.cache_seqlens[b], 0), cache_capacity(p.geo));
    for (int t = 0; t < p.q_len; ++t) for (int h = 0; h < p.heads; ++h) {
      const int hk = h / g;
      const int64_t qo = ((int64_t(b) * p.q_len + t) * p.heads + h) * d;
      std::vector<double> sc; std::vector<std::pair<int64_t, int64_t>> at;
      for (int64_t j = 0; j <= len - p.q_len + t; ++j) {
        int64_t i0, i1;
        if (!locate(p.geo, b, j, i0, i1)) continue;
        double acc = 0;
        for (int c = 0; c < d; ++c) acc += ld(p.dtype, p.q, qo + c) * row(p.k_cache, p.k_exponent, p.k_strides, p.ke_strides, i0, i1, hk, c);
        sc.push_back(acc * p.softmax_scale); at.push_back({i0, i1});
      }
      double mx = -INFINITY, sum = 0;
      for (double s : sc) mx = std::max(mx, s);
      for (double s : sc) sum += std::exp(s - mx);
      p.lse[(int64_t(b) * p.heads + h) * p.q_len + t] = sc.empty() ? -INFINITY : float(mx + std::log(sum));
      for (int c = 0; c < d; ++c) {
        double acc = 0;
        for (size_t j = 0; j < sc.size(); ++j) acc += std::exp(sc[j] - mx) / sum * row(p.v_cache, p.v_exponent, p.v_strides, p.ve_strides, at[j].first, at[j].second, hk, c);
        st(p.dtype, p.out, qo + c, acc);
      }
    }
  }
  return cudaSuccess;
}
cudaError_t kv_cache_append(const KvCacheAppendParams& p, cudaStream_t) {
  const int d = p.head_dim;
  for (int b = 0; b < p.batch; ++b) for (int t = 0; t < p.new_tokens; ++t) {
    int64_t i0, i1;
    if (!locate(p.geo, b, p.start_pos[b] + t, i0, i1)) continue;
    for (int hk = 0; hk < p.kv_heads; ++hk) {
      const int64_t src = ((int64_t(b) * p.new_tokens + t) * p.kv_heads + hk) * d;
      const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
      for (int which = 0; which < 2; ++which) {
        const void* x = static_cast<const char*>(which ? p.v : p.k) + src * es;
        const Strides3& s = which ? p.v_strides : p.k_strides;
        const Strides3& e = which ? p.ve_strides : p.ke_strides;
        uint8_t* m = static_cast<uint8_t*>(which ? p.v_cache : p.k_cache) + i0 * s.s0 + i1 * s.s1 + hk * s.s2;
        uint8_t* ex = (which ? p.v_exponent : p.k_exponent) + i0 * e.s0 + i1 * e.s1 + hk * e.s2;
        llmcore::bfp::cpu::quantize_rows(x, p.dtype, d, d, 8, 32, false, m, d, ex, (d + 31) / 32, 0, 1);
      }
    }
  }
  return cudaSuccess;
}
}}}  // namespace llmcore::decode::cuda
