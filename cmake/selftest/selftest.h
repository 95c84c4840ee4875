// Shared pieces of llmcore_cuda_selftest (cmake/selftest/): results, device buffers, seeded
// inputs, CUDA-event timing and the accuracy rules of the Python tests (docs/testing.md,
// "References and tolerances"), host side only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/half_convert.h"

namespace selftest {

// ---- options and results -------------------------------------------------------------------
struct Options {
  bool reduced = false;   // small sizes and few repetitions (for compute-sanitizer)
  bool time = true;       // time the kernels (off: checks only)
  std::vector<std::string> only;  // groups to run (empty: all), see group_enabled
};
extern Options g_opt;

struct Check {
  std::string name, detail;
  bool ok;
};
struct Timing {
  std::string name, unit;
  double ms, rate, fraction;  // rate in `unit`; fraction of the ceiling (-1: none)
  std::string ceiling;        // what the fraction is of
};
extern std::vector<Check> g_checks;
extern std::vector<Timing> g_timings;
extern double g_copy_gbps;  // measured device-to-device copy bandwidth (0: not measured)

void check(const std::string& name, bool ok, const std::string& detail);
void timing(const std::string& name, double ms, double rate, const std::string& unit,
            double fraction, const std::string& ceiling);
std::string fmt(const char* f, double a, double b = 0, double c = 0, double d = 0);
// The documented dense peak of the device for "fp16" or "int8" tensor-core work, TFLOP/s
// (TOP/s): LLMCORE_PEAK_TFLOPS / LLMCORE_PEAK_TOPS if set, else the H100/H200 SXM figures.
double peak(const char* kind);

// A CUDA call that fails ends the run (the context may be unusable): the failure is recorded
// as a failed check of the running group, the JSON written with what ran so far, the groups
// not run named, exit status 3.
[[noreturn]] void cuda_failed(const char* file, int line, const char* call, cudaError_t err);
#define CU(x)                                                     \
  do {                                                            \
    cudaError_t e_ = (x);                                         \
    if (e_ != cudaSuccess) cuda_failed(__FILE__, __LINE__, #x, e_); \
  } while (0)

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    CU(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void up(const std::vector<T>& h) {
    CU(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> down() const {
    std::vector<T> h(n);
    CU(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison(int byte = 0x7f) { CU(cudaMemset(p, byte, std::max<size_t>(n, 1) * sizeof(T))); }
};

// Seeded normal values (one generator for the whole run: the same inputs every run).
std::vector<float> randn(size_t n, float scale = 1.0f);

// fp16 helpers: round a float to fp16 (as a float), and a vector to fp16 bits in place.
inline float r16(double x) { return llmcore::f16_to_f32(llmcore::f32_to_f16(static_cast<float>(x))); }
inline std::vector<uint16_t> to_half(std::vector<float>& f) {
  std::vector<uint16_t> h(f.size());
  for (size_t i = 0; i < f.size(); ++i) {
    h[i] = llmcore::f32_to_f16(f[i]);
    f[i] = llmcore::f16_to_f32(h[i]);
  }
  return h;
}

// Median time of fn(i) in ms over `runs` calls after `warm` warm-up calls (i counts every
// call, so fn can rotate its inputs), CUDA events on the default stream.
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

// Copies of an input that, rotated, exceed the L2 (so a timed call reads from memory):
// enough copies of `bytes` for 256 MiB, at least 1, at most 16; 1 when reduced.
int rotate_copies(size_t bytes);

// ---- the 2x rule (attention and decode, tests/helpers/__init__.py check_2x) -----------------
// max|actual - ref64| <= 2 * max|lowp - ref64| + floor, where lowp is the same computation
// done at the inputs' precision (here: an fp16 emulation on the host, each op of PyTorch's
// reference rounded to fp16) and floor = 4 unit roundoffs of fp16 (1e-5 for fp32 results)
// at the scale of max(1, max|ref64|). Infinities must be where the reference has them, and
// no NaN.
struct Rule2x {
  double err = 0, err_lowp = 0, amax = 0;
  int64_t inf_mismatch = 0, nan = 0;
  void add(double actual, double ref64, double lowp) {
    if (std::isnan(actual)) {
      ++nan;
      return;
    }
    if (std::isinf(ref64) || std::isinf(actual)) {
      inf_mismatch += !(actual == ref64);
      return;
    }
    err = std::max(err, std::fabs(actual - ref64));
    if (!std::isnan(lowp)) err_lowp = std::max(err_lowp, std::fabs(lowp - ref64));
    amax = std::max(amax, std::fabs(ref64));
  }
  double floor(bool fp32) const { return (fp32 ? 1e-5 : 4 * std::ldexp(1.0, -11)) * std::max(1.0, amax); }
  double bound(bool fp32) const { return 2 * err_lowp + floor(fp32); }
  bool ok(bool fp32) const { return nan == 0 && inf_mismatch == 0 && err <= bound(fp32); }
  std::string detail(bool fp32) const {
    std::string s = fmt("max err %.2e <= 2 x %.2e (fp16 emulation) + %.1e", err, err_lowp, floor(fp32));
    if (nan) s += ", " + std::to_string(nan) + " NaN";
    if (inf_mismatch) s += ", " + std::to_string(inf_mismatch) + " infinities differ";
    return s;
  }
};
// check(name, rule) for a 16-bit output (fp32 = false) or an fp32 one (lse).
void check_2x(const std::string& name, const Rule2x& r, bool fp32);

// ---- the groups -----------------------------------------------------------------------------
bool group_enabled(const std::string& group);
void bench_copy();
void test_bfp_quantize();
void test_bfp_gemv();
void test_bfp_gemm();
void test_attention_fwd();
void test_attention_bwd();
void test_decode();
void test_kv_cache_append();

}  // namespace selftest
