// llmcore_cuda_selftest: every CUDA kernel of llmcore run without torch (built by
// cmake/CMakeLists.txt, statically linked to the CUDA runtime, so a binary built on a CPU
// machine runs on any GPU machine with a driver). docs/testing.md, "The CUDA self-test".
//
//   llmcore_cuda_selftest [--json PATH] [--reduced] [--no-time] [--only G1,G2,..] [--list]
//
// Groups (--only takes names or prefixes: --only attention runs attention.fwd and .bwd):
//   copy            device-to-device copy: the measured bandwidth ceiling (timing only)
//   bfp.quantize    MXINT8 and a packed 4-bit format, both roundings: bytes equal to the
//                   CPU kernel's (exact)
//   bfp.gemv        linear_small_m, M 1/5/16 vs an fp64 host product (the GEMM bound);
//                   timed as GB/s against the copy, weights rotated past the L2
//   bfp.gemm        W8A8 gemm_int8, blocks 32 and 16, fp32/fp16/bf16 out vs an fp64 host
//                   product (the GEMM bound); timed at 4096^3 as TOP/s of the int8 peak
//   attention.fwd   fp16/bf16 dense (GQA, causal, odd sizes), causal q 1024 over k 64 (query
//                   blocks with no key tile) and varlen with a sequence of no key, vs an fp64
//                   host reference by the 2x rule; rows that see no key exactly 0 with lse
//                   -inf on every repetition; timed as TFLOP/s of the fp16 peak
//   attention.bwd   dense GQA causal (atomic and deterministic dQ), the no-key-tile case and
//                   the varlen sequence of no key (deterministic dQ exactly 0 on every
//                   repetition), vs fp64 host gradients by the 2x rule; timed
//   decode          contiguous fp16, paged fp16 with out-of-range page ids, paged MXINT8;
//                   1, 4 and the chosen number of key splits; vs an fp64 host reference
//                   (absent keys removed) by the 2x rule; timed as GB/s against the copy
//   kv_cache_append fp16 rows into a paged MXINT8 cache (one page id out of range): bytes
//                   equal to the CPU quantiser's, nothing else of the cache written
//
// Tolerances are the Python tests' (docs/testing.md): exact for quantisation and cache
// writes; the GEMM bound 8 (K + 1) 2^-24 (|a| |b|^T) plus one rounding of the output; the
// 2x rule for attention and decode, whose "same computation at low precision" is an fp16
// emulation on the host of PyTorch's reference (each op's result rounded to fp16).
// Timings: CUDA events, warm-up, median; inputs larger than the L2 are rotated.
//
// Exit status: 0 when every check passed, 1 when one failed, 2 without a usable GPU (or a
// bad argument), 3 when a CUDA call failed (the run stops there: its message names the
// groups not run, which `--only` can run next). One JSON (--json): device, SMs, driver and runtime versions, the git
// commit baked in at build time, the options, every check and every timing.
#include <cuda_runtime.h>

#include <chrono>
#include <cstring>

#include "selftest.h"

#ifndef LLMCORE_GIT_COMMIT
#define LLMCORE_GIT_COMMIT "unknown"
#endif

namespace selftest {

Options g_opt;
std::vector<Check> g_checks;
std::vector<Timing> g_timings;
double g_copy_gbps = 0;

namespace {
std::mt19937_64 g_rng(20261201);
constexpr int kNumGroups = 8;
const char* const kGroups[kNumGroups] = {"copy", "bfp.quantize", "bfp.gemv", "bfp.gemm",
                                         "attention.fwd", "attention.bwd", "decode",
                                         "kv_cache_append"};
int g_running = -1;  // index of the group running
std::string g_json;  // --json PATH
std::chrono::steady_clock::time_point g_t0;
double elapsed() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - g_t0).count();
}
void write_json(const std::string& path, bool complete);
}  // namespace

void check(const std::string& name, bool ok, const std::string& detail) {
  g_checks.push_back({name, detail, ok});
  std::printf("%-52s %s  %s\n", name.c_str(), ok ? "ok  " : "FAIL", detail.c_str());
  std::fflush(stdout);
}

void timing(const std::string& name, double ms, double rate, const std::string& unit,
            double fraction, const std::string& ceiling) {
  g_timings.push_back({name, unit, ms, rate, fraction, ceiling});
  std::printf("%-52s %9.4f ms  %8.1f %-7s", name.c_str(), ms, rate, unit.c_str());
  if (fraction >= 0) std::printf("  %.2f of %s", fraction, ceiling.c_str());
  std::printf("\n");
  std::fflush(stdout);
}

std::string fmt(const char* f, double a, double b, double c, double d) {
  char buf[320];
  std::snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

double peak(const char* kind) {
  const bool int8 = std::strcmp(kind, "int8") == 0;
  const char* env = std::getenv(int8 ? "LLMCORE_PEAK_TOPS" : "LLMCORE_PEAK_TFLOPS");
  if (env != nullptr && std::atof(env) > 0) return std::atof(env);
  return int8 ? 1979.0 : 989.0;  // H100/H200 SXM dense int8 TOP/s, fp16/bf16 TFLOP/s
}

std::vector<float> randn(size_t n, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g_rng);
  return v;
}

int rotate_copies(size_t bytes) {
  if (g_opt.reduced || bytes == 0) return 1;
  const size_t want = size_t{256} << 20;
  return static_cast<int>(std::clamp<size_t>((want + bytes - 1) / bytes, 1, 16));
}

void check_2x(const std::string& name, const Rule2x& r, bool fp32) {
  check(name, r.ok(fp32), r.detail(fp32));
}

bool group_enabled(const std::string& group) {
  if (g_opt.only.empty()) return true;
  for (const std::string& o : g_opt.only)
    if (group == o || (group.rfind(o, 0) == 0 && group[o.size()] == '.')) return true;
  return false;
}

// ---- copy ceiling ---------------------------------------------------------------------------
void bench_copy() {
  const size_t bytes = g_opt.reduced ? (size_t{64} << 20) : (size_t{1} << 31);  // 2 GiB
  DevBuf<char> a(bytes), b(bytes);
  CU(cudaMemset(a.p, 1, bytes));
  const double ms = time_ms(
      [&](int) { CU(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); }, 2,
      g_opt.reduced ? 3 : 10);
  g_copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
  timing("copy.d2d " + std::to_string(bytes >> 20) + " MiB (read + write)", ms, g_copy_gbps, "GB/s",
         1.0, "the copy");
}

namespace {

// The enabled groups after the running one (comma-separated).
std::string pending_groups() {
  std::string s;
  for (int i = std::max(g_running + 1, 0); i < kNumGroups; ++i)
    if (group_enabled(kGroups[i]) && (i > 0 || g_opt.time)) {
      if (!s.empty()) s += ',';
      s += kGroups[i];
    }
  return s;
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

void write_json(const std::string& path, bool complete) {
  const double secs = elapsed();
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "llmcore_cuda_selftest: cannot write %s\n", path.c_str());
    return;
  }
  int dev = 0, drv = 0, rt = 0;
  cudaDeviceProp prop{};
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&prop, dev);
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  std::string only;
  for (const std::string& o : g_opt.only) {
    if (!only.empty()) only += ',';
    only += o;
  }
  std::fprintf(f, "{\n  \"device\": \"%s\", \"sm\": \"%d.%d\", \"sms\": %d, \"l2_bytes\": %d,\n",
               json_escape(prop.name).c_str(), prop.major, prop.minor, prop.multiProcessorCount,
               prop.l2CacheSize);
  std::fprintf(f, "  \"driver_version\": %d, \"runtime_version\": %d, \"git_commit\": \"%s\",\n", drv,
               rt, json_escape(LLMCORE_GIT_COMMIT).c_str());
  std::fprintf(f, "  \"reduced\": %s, \"timed\": %s, \"only\": \"%s\", \"seconds\": %.1f,\n",
               g_opt.reduced ? "true" : "false", g_opt.time ? "true" : "false",
               json_escape(only).c_str(), secs);
  std::fprintf(f, "  \"complete\": %s, \"groups_not_run\": \"%s\",\n", complete ? "true" : "false",
               json_escape(pending_groups()).c_str());
  std::fprintf(f, "  \"copy_gbps\": %.6g, \"peak_fp16_tflops\": %.6g, \"peak_int8_tops\": %.6g,\n",
               g_copy_gbps, peak("fp16"), peak("int8"));
  std::fprintf(f, "  \"checks\": [\n");
  for (size_t i = 0; i < g_checks.size(); ++i)
    std::fprintf(f, "    {\"name\": \"%s\", \"ok\": %s, \"detail\": \"%s\"}%s\n",
                 json_escape(g_checks[i].name).c_str(), g_checks[i].ok ? "true" : "false",
                 json_escape(g_checks[i].detail).c_str(), i + 1 < g_checks.size() ? "," : "");
  std::fprintf(f, "  ],\n  \"timings\": [\n");
  for (size_t i = 0; i < g_timings.size(); ++i) {
    const Timing& t = g_timings[i];
    std::fprintf(f,
                 "    {\"name\": \"%s\", \"ms\": %.6g, \"rate\": %.6g, \"unit\": \"%s\", "
                 "\"fraction\": %.4g, \"of\": \"%s\"}%s\n",
                 json_escape(t.name).c_str(), t.ms, t.rate, t.unit.c_str(), t.fraction,
                 json_escape(t.ceiling).c_str(), i + 1 < g_timings.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
}

}  // namespace

void cuda_failed(const char* file, int line, const char* call, cudaError_t err) {
  const std::string group = g_running >= 0 && g_running < kNumGroups ? kGroups[g_running] : "setup";
  check(group + ": CUDA error", false,
        std::string(cudaGetErrorString(err)) + " from " + call + " (" + file + ":" + std::to_string(line) + ")");
  const std::string pending = pending_groups();
  std::printf("llmcore_cuda_selftest: stopped by a CUDA error in %s; groups not run: %s\n", group.c_str(),
              pending.empty() ? "none" : pending.c_str());
  if (!g_json.empty()) write_json(g_json, false);
  std::fflush(stdout);
  std::_Exit(3);
}

namespace {

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--json PATH] [--reduced] [--no-time] [--only GROUP[,GROUP..]] [--list]\n",
               argv0);
  return 2;
}

}  // namespace
}  // namespace selftest

int main(int argc, char** argv) {
  using namespace selftest;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      json = argv[++i];
    } else if (!std::strcmp(argv[i], "--reduced")) {
      g_opt.reduced = true;
    } else if (!std::strcmp(argv[i], "--no-time")) {
      g_opt.time = false;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      std::string s = argv[++i];
      for (size_t a = 0; a <= s.size();) {
        const size_t b = std::min(s.find(',', a), s.size());
        if (b > a) g_opt.only.push_back(s.substr(a, b - a));
        a = b + 1;
      }
    } else if (!std::strcmp(argv[i], "--list")) {
      for (const char* g : kGroups) std::printf("%s\n", g);
      return 0;
    } else {
      return usage(argv[0]);
    }
  }
  for (const std::string& o : g_opt.only) {  // every name must select at least one group
    bool known = false;
    for (const char* g : kGroups) {
      const std::string gs = g;
      known = known || gs == o || (gs.rfind(o, 0) == 0 && gs[o.size()] == '.');
    }
    if (!known) {
      std::fprintf(stderr, "llmcore_cuda_selftest: unknown group '%s' (--list lists them)\n", o.c_str());
      return 2;
    }
  }
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    std::fprintf(stderr,
                 "llmcore_cuda_selftest: no usable CUDA device (%s); this program needs an NVIDIA "
                 "GPU and its driver\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "no device found");
    return 2;
  }
  cudaDeviceProp prop{};
  CU(cudaGetDeviceProperties(&prop, 0));
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  std::printf("llmcore_cuda_selftest: %s (sm %d.%d, %d SMs), driver %d, runtime %d, commit %s%s\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, drv, rt,
              LLMCORE_GIT_COMMIT, g_opt.reduced ? ", reduced" : "");
  g_json = json;
  g_t0 = std::chrono::steady_clock::now();
  // The copy first: the bandwidth-bound timings are reported as fractions of it. The JSON
  // is rewritten after each group, so a run cut off keeps what finished.
  void (*const run[])() = {bench_copy, test_bfp_quantize, test_bfp_gemv, test_bfp_gemm,
                           test_attention_fwd, test_attention_bwd, test_decode,
                           test_kv_cache_append};
  for (int i = 0; i < kNumGroups; ++i) {
    g_running = i;
    if (group_enabled(kGroups[i]) && (i > 0 || g_opt.time)) {
      run[i]();
      if (!g_json.empty()) write_json(g_json, false);
    }
  }
  g_running = kNumGroups;
  int failed = 0;
  for (const Check& c : g_checks) failed += !c.ok;
  std::printf("llmcore_cuda_selftest: %d checks, %d failed, %d timings, %.1f s\n",
              int(g_checks.size()), failed, int(g_timings.size()), elapsed());
  if (!g_json.empty()) write_json(g_json, true);
  return failed ? 1 : 0;
}
