// llmcore_cuda_selftest: the CUDA kernels run without torch (built by cmake/CMakeLists.txt,
// statically linked to the CUDA runtime, so the binary built on a CPU machine runs on any
// GPU machine with a driver). docs/testing.md, "The CUDA self-test".
//
//   llmcore_cuda_selftest [--json PATH] [--reduced]
//
// Checks, on seeded random inputs:
//   bfp.quantize   mxint8 (8 bits, block 32) and a packed 4-bit format (block 16), fp32 in,
//                  both roundings: bytes equal to the CPU kernel's (bfp::cpu::quantize_rows)
//   bfp.gemv       linear_small_m, fp32, M = 1, 5, 16: against an fp64 host product of x
//                  and the exactly dequantised weight, within 8 K 2^-24 (|x| |w|^T) + 2^-24
//                  |y| (fp32 accumulation; the Python tests' GEMM bound)
//   attention.fwd  fp16 dense (GQA, causal; causal q 1024 over k 64, whose first query
//                  blocks have no key tile, repeated) and varlen (a sequence with no key):
//                  against an fp64 host softmax(QK^T)V, within 2^-9 max|ref| + 2^-10 (a
//                  fixed bound, looser than the Python tests' 2x rule); rows that see no
//                  key exactly 0 with lse -inf on every repetition
// Times (CUDA events, warm-up, median of the runs, inputs rotated past L2 for the GEMV):
//   copy.d2d (the bandwidth ceiling), bfp.gemv (GB/s of the weight + x + y), attention.fwd
//   (TFLOP/s, 4 Sq Sk D H, halved for causal), each with its fraction of the ceiling
//   (the copy for bandwidth, LLMCORE_PEAK_TFLOPS or 989 (H100/H200 dense fp16) for compute).
//   decode         fp16 paged cache (GQA 4, q_len 4) with a page id past the end and one of
//                  -1 (absent keys), 1, 4 and the chosen number of key splits: against an
//                  fp64 host reference without those pages, the same fixed bound
// Not covered yet: W8A8 GEMM, attention backward, decode with a contiguous or MXINT8
// cache, kv_cache_append: the Python tests (pytest -m cuda) cover them.
//
// Exit status: 0 when every check passed, 1 otherwise, 2 without a usable GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention/attention_cuda.cuh"
#include "bfp/bfp_cpu.h"
#include "bfp/bfp_cuda.cuh"
#include "common/half_convert.h"
#include "decode/decode_cuda.cuh"

#ifndef LLMCORE_GIT_COMMIT
#define LLMCORE_GIT_COMMIT "unknown"
#endif

namespace {

using llmcore::DType;

// ---- results ------------------------------------------------------------------------------
struct Check {
  std::string name, detail;
  bool ok;
};
struct Timing {
  std::string name, unit;
  double ms, rate, fraction;  // rate in `unit`; fraction of the ceiling (-1: none)
};
std::vector<Check> g_checks;
std::vector<Timing> g_timings;

void check(const std::string& name, bool ok, const std::string& detail) {
  g_checks.push_back({name, detail, ok});
  std::printf("%-44s %s  %s\n", name.c_str(), ok ? "ok  " : "FAIL", detail.c_str());
}

std::string fmt(const char* f, double a, double b = 0, double c = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) continue;
    o += ch;
  }
  return o;
}

#define CU(x)                                                                             \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) { CU(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void up(const std::vector<T>& h) { CU(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> down() const {
    std::vector<T> h(n);
    CU(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

std::mt19937_64 g_rng(20261201);
std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g_rng);
  return v;
}

// Median time of fn() in ms over `runs` (after `warm` warm-ups), CUDA events.
template <typename F>
double time_ms(F&& fn, int warm, int runs) {
  for (int i = 0; i < warm; ++i) fn(i);
  cudaEvent_t a, b;
  CU(cudaEventCreate(&a));
  CU(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < runs; ++i) {
    CU(cudaEventRecord(a));
    fn(warm + i);
    CU(cudaEventRecord(b));
    CU(cudaEventSynchronize(b));
    float ms = 0;
    CU(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CU(cudaEventDestroy(a));
  CU(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// ---- copy ceiling ------------------------------------------------------------------------
double g_copy_gbps = 0;
void bench_copy(bool reduced) {
  const size_t bytes = reduced ? (64u << 20) : (size_t{1} << 31);  // 2 GiB
  DevBuf<char> a(bytes), b(bytes);
  CU(cudaMemset(a.p, 1, bytes));
  const double ms = time_ms([&](int) { CU(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); },
                            2, reduced ? 3 : 10);
  g_copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
  g_timings.push_back({"copy.d2d " + std::to_string(bytes >> 20) + " MiB", "GB/s", ms, g_copy_gbps, 1.0});
  std::printf("%-44s %.3f ms  %.0f GB/s (read + write)\n", "copy.d2d", ms, g_copy_gbps);
}

// ---- BFP quantise: bit-exact with the CPU kernel ----------------------------------------------
void test_quantize(bool reduced) {
  struct Fmt {
    int bits, block;
  };
  const int64_t rows = reduced ? 64 : 1024, k = 1000;  // k not a multiple of the block
  std::vector<float> x = randn(rows * k);
  for (int64_t i = 0; i < rows * k; i += 97) x[i] *= std::ldexp(1.0f, static_cast<int>(i % 60) - 30);
  DevBuf<float> dx(rows * k);
  dx.up(x);
  for (Fmt f : {Fmt{8, 32}, Fmt{4, 16}}) {
    for (bool even : {false, true}) {
      const int64_t mc = llmcore::bfp::cpu::mantissa_cols(k, f.bits);
      const int64_t ec = llmcore::bfp::cpu::exponent_cols(k, f.block);
      std::vector<uint8_t> hm(rows * mc), he(rows * ec);
      llmcore::bfp::cpu::quantize_rows(x.data(), DType::kFloat32, k, k, f.bits, f.block, even,
                                       hm.data(), mc, he.data(), ec, 0, rows);
      DevBuf<uint8_t> dm(rows * mc), de(rows * ec);
      CU(llmcore::bfp::cuda::quantize(dx.p, DType::kFloat32, rows, k, k, f.bits, f.block, even,
                                      dm.p, mc, de.p, ec, nullptr));
      CU(cudaDeviceSynchronize());
      const auto gm = dm.down(), ge = de.down();
      int64_t bad = 0;
      for (size_t i = 0; i < gm.size(); ++i) bad += gm[i] != hm[i];
      for (size_t i = 0; i < ge.size(); ++i) bad += ge[i] != he[i];
      check("bfp.quantize bits " + std::to_string(f.bits) + " block " + std::to_string(f.block) +
                (even ? " even" : " nearest"),
            bad == 0, std::to_string(bad) + " bytes differ from the CPU kernel");
    }
  }
}

// ---- BFP GEMV ----------------------------------------------------------------------------
void test_gemv(bool reduced) {
  const int bits = 8, block = 32;
  const int64_t n = reduced ? 512 : 8192, k = reduced ? 512 : 8192;
  const int64_t mc = k, ec = llmcore::bfp::cpu::exponent_cols(k, block);
  std::vector<float> w = randn(n * k, 0.05f);
  std::vector<uint8_t> wm(n * mc), we(n * ec);
  llmcore::bfp::cpu::quantize_rows(w.data(), DType::kFloat32, k, k, bits, block, false, wm.data(),
                                   mc, we.data(), ec, 0, n);
  std::vector<float> wd(n * k);  // exact dequantised weight
  llmcore::bfp::cpu::dequantize_rows(wm.data(), mc, we.data(), ec, k, bits, block, wd.data(),
                                     DType::kFloat32, k, 0, n);
  // Rotate several weight copies so that a timed call reads its weight from memory (L2 on
  // an H100/H200 is 50/60 MB; 4 copies of 64 MiB).
  const int copies = reduced ? 1 : 4;
  std::vector<DevBuf<uint8_t>*> dwm, dwe;
  for (int c = 0; c < copies; ++c) {
    dwm.push_back(new DevBuf<uint8_t>(n * mc));
    dwe.push_back(new DevBuf<uint8_t>(n * ec));
    dwm.back()->up(wm);
    dwe.back()->up(we);
  }
  for (int m : {1, 5, 16}) {
    std::vector<float> x = randn(m * k);
    DevBuf<float> dx(m * k), dy(m * n);
    dx.up(x);
    CU(llmcore::bfp::cuda::linear_small_m(dx.p, DType::kFloat32, m, k, k, dwm[0]->p, mc, dwe[0]->p,
                                          ec, n, bits, block, nullptr, dy.p, n, nullptr));
    CU(cudaDeviceSynchronize());
    const auto y = dy.down();
    int64_t bad = 0;
    double worst = 0;
    for (int i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double ref = 0, mag = 0;
        for (int64_t kk = 0; kk < k; ++kk) {
          ref += static_cast<double>(x[i * k + kk]) * wd[j * k + kk];
          mag += std::fabs(static_cast<double>(x[i * k + kk]) * wd[j * k + kk]);
        }
        const double err = std::fabs(y[i * n + j] - ref);
        const double bound = 8.0 * k * std::ldexp(1.0, -24) * mag + std::ldexp(1.0, -24) * std::fabs(ref);
        bad += !(err <= bound);
        worst = std::max(worst, err / std::max(bound, 1e-300));
      }
    check("bfp.gemv mxint8 fp32 m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k),
          bad == 0, fmt("%.0f elements over the bound; worst err/bound %.3f", double(bad), worst));
    const double ms = time_ms(
        [&](int i) {
          const int c = i % copies;
          CU(llmcore::bfp::cuda::linear_small_m(dx.p, DType::kFloat32, m, k, k, dwm[c]->p, mc,
                                                dwe[c]->p, ec, n, bits, block, nullptr, dy.p, n,
                                                nullptr));
        },
        3, reduced ? 3 : 50);
    const double bytes = double(n) * (mc + ec) + 4.0 * m * (k + n);
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    g_timings.push_back({"bfp.gemv m " + std::to_string(m), "GB/s", ms, gbps,
                         g_copy_gbps > 0 ? gbps / g_copy_gbps : -1});
    std::printf("%-44s %.4f ms  %.0f GB/s  %.2f of the copy\n", ("bfp.gemv m " + std::to_string(m)).c_str(),
                ms, gbps, g_copy_gbps > 0 ? gbps / g_copy_gbps : -1.0);
  }
  for (int c = 0; c < copies; ++c) {
    delete dwm[c];
    delete dwe[c];
  }
}

// ---- attention forward -----------------------------------------------------------------
// fp64 host reference of one (sequence, head): q [sq][D], k/v [sk][D] (floats of the fp16
// inputs), bottom-right causal. out [sq][D], lse [sq] (-inf for a row with no key).
void attention_ref(const float* q, const float* k, const float* v, int sq, int sk, int d,
                   int64_t q_rs, int64_t kv_rs, bool causal, double scale, std::vector<double>& out,
                   std::vector<double>& lse) {
  out.assign(size_t(sq) * d, 0.0);
  lse.assign(sq, -INFINITY);
  std::vector<double> s(sk);
  for (int i = 0; i < sq; ++i) {
    const int last = causal ? std::min(sk - 1, i + sk - sq) : sk - 1;
    if (last < 0) continue;
    double mx = -INFINITY;
    for (int j = 0; j <= last; ++j) {
      double acc = 0;
      for (int c = 0; c < d; ++c) acc += double(q[i * q_rs + c]) * k[j * kv_rs + c];
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
    double l = 0;
    for (int j = 0; j <= last; ++j) l += (s[j] = std::exp(s[j] - mx));
    for (int j = 0; j <= last; ++j)
      for (int c = 0; c < d; ++c) out[size_t(i) * d + c] += s[j] / l * v[j * kv_rs + c];
    lse[i] = mx + std::log(l);
  }
}

struct AttnCase {
  std::string name;
  int batch, h, hkv, d;
  std::vector<int> lq, lk;  // per sequence; dense when varlen is false (all equal)
  bool varlen, causal;
  int reps;                  // repetitions of the no-key-rows check
  bool verify;               // against the host reference (not for the large timed case)
};

void run_attention_case(const AttnCase& c, bool timed, bool reduced) {
  namespace at = llmcore::attention::cuda;
  const int nseq = static_cast<int>(c.lq.size());
  std::vector<int> cq{0}, ck{0};
  for (int i = 0; i < nseq; ++i) {
    cq.push_back(cq.back() + c.lq[i]);
    ck.push_back(ck.back() + c.lk[i]);
  }
  const int64_t tq = cq.back(), tk = ck.back();
  const int d = c.d;
  std::vector<float> qf = randn(tq * c.h * d), kf = randn(tk * c.hkv * d), vf = randn(tk * c.hkv * d);
  auto to_half = [](std::vector<float>& f) {  // round to fp16 in place, return the bits
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      h[i] = llmcore::f32_to_f16(f[i]);
      f[i] = llmcore::f16_to_f32(h[i]);
    }
    return h;
  };
  const auto qh = to_half(qf), kh = to_half(kf), vh = to_half(vf);
  DevBuf<uint16_t> dq(qh.size()), dk(kh.size()), dv(vh.size()), dout(qh.size());
  DevBuf<float> dlse(size_t(c.h) * tq);
  DevBuf<int> dcq(cq.size()), dck(ck.size());
  dq.up(qh);
  dk.up(kh);
  dv.up(vh);
  dcq.up(cq);
  dck.up(ck);

  at::FwdParams p;
  p.dtype = DType::kFloat16;
  p.head_dim = d;
  p.heads = c.h;
  p.kv_heads = c.hkv;
  p.q = dq.p;
  p.k = dk.p;
  p.v = dv.p;
  p.out = dout.p;
  p.lse = dlse.p;
  p.scale = static_cast<float>(1.0 / std::sqrt(double(d)));
  p.causal = c.causal;
  p.q_row_stride = p.o_row_stride = int64_t(c.h) * d;
  p.k_row_stride = p.v_row_stride = int64_t(c.hkv) * d;
  p.q_head_stride = p.o_head_stride = p.k_head_stride = p.v_head_stride = d;
  if (c.varlen) {
    p.batch = nseq;
    p.seqlen_q = *std::max_element(c.lq.begin(), c.lq.end());
    p.seqlen_k = *std::max_element(c.lk.begin(), c.lk.end());
    p.cu_seqlens_q = dcq.p;
    p.cu_seqlens_k = dck.p;
    p.total_q = tq;
    p.total_k = tk;
    p.lse_head_stride = tq;  // lse [H, Tq]
  } else {
    p.batch = nseq;
    p.seqlen_q = c.lq[0];
    p.seqlen_k = c.lk[0];
    p.q_batch_stride = p.o_batch_stride = int64_t(c.lq[0]) * c.h * d;
    p.k_batch_stride = p.v_batch_stride = int64_t(c.lk[0]) * c.hkv * d;
    p.lse_batch_stride = int64_t(c.h) * c.lq[0];
    p.lse_head_stride = c.lq[0];
  }
  CU(at::attention_fwd(p, nullptr));
  CU(cudaDeviceSynchronize());
  if (c.verify) {
  const auto out = dout.down();
  const auto lse = dlse.down();

  // reference, per sequence and head
  double max_err = 0, max_ref = 0, lse_err = 0;
  int64_t lse_bad = 0;
  std::vector<double> ro, rl;
  std::vector<uint8_t> dead(size_t(tq) * c.h, 0);
  for (int b = 0; b < nseq; ++b)
    for (int hh = 0; hh < c.h; ++hh) {
      const int hk = hh / (c.h / c.hkv);
      attention_ref(qf.data() + (cq[b] * c.h + hh) * int64_t(d), kf.data() + (ck[b] * c.hkv + hk) * int64_t(d),
                    vf.data() + (ck[b] * c.hkv + hk) * int64_t(d), c.lq[b], c.lk[b], d, int64_t(c.h) * d,
                    int64_t(c.hkv) * d, c.causal, p.scale, ro, rl);
      for (int i = 0; i < c.lq[b]; ++i) {
        const int64_t row = cq[b] + i;
        const int64_t li = c.varlen ? hh * tq + row : (int64_t(b) * c.h + hh) * c.lq[0] + i;
        if (std::isinf(rl[i])) {
          dead[row * c.h + hh] = 1;
          lse_bad += !(std::isinf(lse[li]) && lse[li] < 0);
        } else {
          lse_err = std::max(lse_err, std::fabs(lse[li] - rl[i]));
        }
        for (int cc = 0; cc < d; ++cc) {
          const double got = llmcore::f16_to_f32(out[(row * c.h + hh) * d + cc]);
          max_err = std::max(max_err, std::fabs(got - ro[size_t(i) * d + cc]));
          max_ref = std::max(max_ref, std::fabs(ro[size_t(i) * d + cc]));
        }
      }
    }
  const double bound = std::ldexp(max_ref, -9) + std::ldexp(1.0, -10);
  check(std::string("attention.fwd ") + c.name, max_err <= bound && lse_bad == 0 && lse_err <= 1e-3,
        fmt("max err %.2e (bound %.2e), lse err %.2e", max_err, bound, lse_err) +
            (lse_bad ? ", " + std::to_string(lse_bad) + " rows with no key without lse -inf" : ""));

  // rows that see no key: exactly 0 on every repetition
  if (c.reps > 0) {
    int64_t bad = 0;
    const int reps = reduced ? std::min(c.reps, 3) : c.reps;
    for (int r = 0; r < reps; ++r) {
      CU(cudaMemset(dout.p, 0x7f, dout.n * sizeof(uint16_t)));  // poison: a skipped write shows
      CU(at::attention_fwd(p, nullptr));
      const auto o = dout.down();
      for (int64_t row = 0; row < tq; ++row)
        for (int hh = 0; hh < c.h; ++hh)
          if (dead[row * c.h + hh])
            for (int cc = 0; cc < d; ++cc) bad += (o[(row * c.h + hh) * d + cc] & 0x7fff) != 0;
    }
    check(std::string("attention.fwd ") + c.name + " no-key rows x" + std::to_string(reps), bad == 0,
          std::to_string(bad) + " elements of rows with no key not exactly 0");
  }
  }  // verify

  if (timed) {
    const double ms = time_ms([&](int) { CU(at::attention_fwd(p, nullptr)); }, 3, reduced ? 3 : 20);
    double flops = 0;
    for (int b = 0; b < nseq; ++b) flops += 4.0 * c.lq[b] * c.lk[b] * d * c.h * (c.causal ? 0.5 : 1.0);
    const double tflops = flops / (ms * 1e-3) / 1e12;
    const char* env = std::getenv("LLMCORE_PEAK_TFLOPS");
    const double peak = env ? std::atof(env) : 989.0;
    g_timings.push_back({std::string("attention.fwd ") + c.name, "TFLOP/s", ms, tflops, tflops / peak});
    std::printf("%-44s %.3f ms  %.1f TFLOP/s  %.2f of %.0f\n", (std::string("attention.fwd ") + c.name).c_str(),
                ms, tflops, tflops / peak, peak);
  }
}

void test_attention(bool reduced) {
  const int s = reduced ? 256 : 4096;
  run_attention_case({"gqa 8:2 causal d64", 1, 8, 2, 64, {97}, {97}, false, true, 0, true}, false, reduced);
  run_attention_case({"causal q1024 k64 d128", 1, 8, 8, 128, {1024}, {64}, false, true, 100, true}, false, reduced);
  run_attention_case({"varlen q[128,4] k[0,8] d128", 0, 8, 8, 128, {128, 4}, {0, 8}, true, true, 100, true},
                     false, reduced);
  run_attention_case({"varlen q[128,4] k[0,8] d128 non-causal", 0, 8, 8, 128, {128, 4}, {0, 8}, true, false, 100, true},
                     false, reduced);
  run_attention_case({"dense b2 h16 s" + std::to_string(s) + " d128 causal", 2, 16, 16, 128, {s, s}, {s, s},
                      false, true, 0, false},
                     true, reduced);
}

// ---- decode attention: paged fp16 cache with out-of-range page ids, 1 and 4 splits ---------
void test_decode(bool reduced) {
  namespace dc = llmcore::decode::cuda;
  const int b = 2, lq = 4, hkv = 2, g = 4, h = hkv * g, d = 128, page = 16;
  const int max_pages = reduced ? 8 : 64, pages = b * max_pages + 2;
  const std::vector<int> lens = {max_pages * page - 5, max_pages * page / 2 + 3};
  std::vector<int> table(size_t(b) * max_pages);
  for (int i = 0; i < b * max_pages; ++i) table[i] = (i * 7 + 3) % pages;  // shuffled, distinct
  table[1] = pages + 3;  // sequence 0, positions 16..31: a page id past the end
  table[max_pages] = -1;  // sequence 1, positions 0..15
  std::vector<float> qf = randn(size_t(b) * lq * h * d), kf = randn(size_t(pages) * page * hkv * d),
                     vf = randn(size_t(pages) * page * hkv * d);
  auto to_half = [](std::vector<float>& f) {
    std::vector<uint16_t> hb(f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      hb[i] = llmcore::f32_to_f16(f[i]);
      f[i] = llmcore::f16_to_f32(hb[i]);
    }
    return hb;
  };
  const auto qh = to_half(qf), kh = to_half(kf), vh = to_half(vf);
  DevBuf<uint16_t> dq(qh.size()), dk(kh.size()), dv(vh.size()), dout(qh.size());
  DevBuf<float> dlse(size_t(b) * h * lq);
  DevBuf<int32_t> dtable(table.size()), dlens(lens.size());
  dq.up(qh);
  dk.up(kh);
  dv.up(vh);
  dtable.up(table);
  dlens.up(lens);

  dc::DecodeAttentionParams p;
  p.q = dq.p;
  p.k_cache = dk.p;
  p.v_cache = dv.p;
  p.k_strides = p.v_strides = {int64_t(page) * hkv * d, int64_t(hkv) * d, d};
  p.geo.dim0 = pages;
  p.geo.dim1 = page;
  p.geo.block_table = dtable.p;
  p.geo.bt_stride = max_pages;
  p.geo.max_pages = max_pages;
  p.cache_seqlens = dlens.p;
  p.batch = b;
  p.q_len = lq;
  p.heads = h;
  p.kv_heads = hkv;
  p.head_dim = d;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(double(d)));
  p.dtype = DType::kFloat16;
  p.out = dout.p;
  p.lse = dlse.p;

  // fp64 reference: keys j <= len - lq + t whose page id is valid
  std::vector<double> ref(qh.size(), 0.0), ref_lse(size_t(b) * h * lq, -INFINITY);
  double max_ref = 0;
  for (int bb = 0; bb < b; ++bb)
    for (int t = 0; t < lq; ++t)
      for (int hh = 0; hh < h; ++hh) {
        const int hk = hh / g;
        const float* qv = qf.data() + ((size_t(bb) * lq + t) * h + hh) * d;
        std::vector<double> sc;
        std::vector<const float*> vrows;
        for (int j = 0; j <= lens[bb] - lq + t; ++j) {
          const int pid = table[size_t(bb) * max_pages + j / page];
          if (pid < 0 || pid >= pages) continue;
          const size_t off = ((size_t(pid) * page + j % page) * hkv + hk) * d;
          double acc = 0;
          for (int c = 0; c < d; ++c) acc += double(qv[c]) * kf[off + c];
          sc.push_back(acc * p.softmax_scale);
          vrows.push_back(vf.data() + off);
        }
        if (sc.empty()) continue;
        const double mx = *std::max_element(sc.begin(), sc.end());
        double l = 0;
        for (double& x : sc) l += (x = std::exp(x - mx));
        double* o = ref.data() + ((size_t(bb) * lq + t) * h + hh) * d;
        for (size_t j = 0; j < sc.size(); ++j)
          for (int c = 0; c < d; ++c) o[c] += sc[j] / l * vrows[j][c];
        for (int c = 0; c < d; ++c) max_ref = std::max(max_ref, std::fabs(o[c]));
        ref_lse[(size_t(bb) * h + hh) * lq + t] = mx + std::log(l);
      }

  int dev = 0;
  CU(cudaGetDevice(&dev));
  for (int splits : {1, 4, dc::decode_attention_num_splits(p, dev)}) {
    p.num_splits = splits;
    const int64_t ws = dc::decode_attention_workspace_floats(p, splits);
    DevBuf<float> work(ws > 0 ? ws : 1);
    p.partial_out = ws > 0 ? work.p : nullptr;
    p.partial_lse = ws > 0 ? work.p + int64_t(b) * h * lq * splits * d : nullptr;
    CU(dc::decode_attention(p, nullptr));
    CU(cudaDeviceSynchronize());
    const auto out = dout.down();
    const auto lse = dlse.down();
    double err = 0, lerr = 0;
    for (size_t i = 0; i < out.size(); ++i) err = std::max(err, std::fabs(llmcore::f16_to_f32(out[i]) - ref[i]));
    for (size_t i = 0; i < lse.size(); ++i) lerr = std::max(lerr, std::fabs(lse[i] - ref_lse[i]));
    const double bound = std::ldexp(max_ref, -9) + std::ldexp(1.0, -10);
    check("decode.paged fp16 bad page ids, splits " + std::to_string(splits), err <= bound && lerr <= 1e-3,
          fmt("max err %.2e (bound %.2e), lse err %.2e", err, bound, lerr));
  }
}

void write_json(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    return;
  }
  int dev = 0, drv = 0, rt = 0;
  cudaDeviceProp prop{};
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&prop, dev);
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  std::fprintf(f, "{\n  \"device\": \"%s\", \"sm\": \"%d.%d\", \"sms\": %d,\n", json_escape(prop.name).c_str(),
               prop.major, prop.minor, prop.multiProcessorCount);
  std::fprintf(f, "  \"driver_version\": %d, \"runtime_version\": %d, \"git_commit\": \"%s\",\n", drv, rt,
               json_escape(LLMCORE_GIT_COMMIT).c_str());
  std::fprintf(f, "  \"checks\": [\n");
  for (size_t i = 0; i < g_checks.size(); ++i)
    std::fprintf(f, "    {\"name\": \"%s\", \"ok\": %s, \"detail\": \"%s\"}%s\n", json_escape(g_checks[i].name).c_str(),
                 g_checks[i].ok ? "true" : "false", json_escape(g_checks[i].detail).c_str(),
                 i + 1 < g_checks.size() ? "," : "");
  std::fprintf(f, "  ],\n  \"timings\": [\n");
  for (size_t i = 0; i < g_timings.size(); ++i) {
    const Timing& t = g_timings[i];
    std::fprintf(f, "    {\"name\": \"%s\", \"ms\": %.6g, \"rate\": %.6g, \"unit\": \"%s\", \"fraction\": %.4g}%s\n",
                 json_escape(t.name).c_str(), t.ms, t.rate, t.unit.c_str(), t.fraction,
                 i + 1 < g_timings.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  std::string json;
  bool reduced = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--reduced")) reduced = true;
    else {
      std::fprintf(stderr, "usage: %s [--json PATH] [--reduced]\n", argv[0]);
      return 2;
    }
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "llmcore_cuda_selftest: no CUDA device\n");
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  bench_copy(reduced);
  test_quantize(reduced);
  test_gemv(reduced);
  test_attention(reduced);
  test_decode(reduced);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int failed = 0;
  for (const Check& c : g_checks) failed += !c.ok;
  std::printf("llmcore_cuda_selftest: %d checks, %d failed, %.1f s\n", int(g_checks.size()), failed, secs);
  if (!json.empty()) write_json(json);
  return failed ? 1 : 0;
}
