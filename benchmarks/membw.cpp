// Streaming-read memory bandwidth: the roofline of a decode GEMV, which reads every weight
// byte once per call. Each thread sums its slice of a buffer far larger than the last-level
// cache with 64-byte AVX-512 loads (four independent accumulators, so the loads are not
// serialised), which is what a GEMV's weight stream looks like to the memory system.
//
//   g++ -O3 -march=native -fopenmp benchmarks/membw.cpp -o /tmp/membw
//   /tmp/membw [MiB=512] [reps=15] [threads=1,2] [pages=4k|huge]
//
// Prints one JSON line per thread count: median / best GB/s over `reps` full passes.
// pages=huge advises the buffer MADV_HUGEPAGE (transparent huge pages, Linux), as
// llmcore's weight arena is (csrc/common/hugepages_binding.cpp): on 4 KB pages the hardware
// prefetchers stop at every page boundary.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

__attribute__((target("avx512f"), noinline)) static int64_t sum_slice(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? strtoull(argv[1], nullptr, 10) : 512;
  const int reps = argc > 2 ? atoi(argv[2]) : 15;
  std::vector<int> threads;
  for (std::string s = argc > 3 ? argv[3] : "1,2"; !s.empty();) {
    const size_t c = s.find(',');
    threads.push_back(atoi(s.substr(0, c).c_str()));
    s = c == std::string::npos ? "" : s.substr(c + 1);
  }
  const size_t n = mib << 20;
  const bool huge = argc > 4 && std::string(argv[4]) == "huge";
  auto* buf = static_cast<uint8_t*>(aligned_alloc(2 << 20, n));
  if (huge) madvise(buf, n, MADV_HUGEPAGE);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i += 4096) memset(buf + i, static_cast<int>(i >> 12), 4096);
  int64_t sink = 0;
  for (int t : threads) {
    std::vector<double> gbps;
    for (int r = 0; r < reps + 1; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      int64_t s = 0;
#pragma omp parallel num_threads(t) reduction(+ : s)
      {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const size_t per = n / nt / 256 * 256;
        s += sum_slice(buf + id * per, per);
      }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      sink += s;
      if (r > 0) gbps.push_back(static_cast<double>(n) / dt / 1e9);  // r = 0 warms up
    }
    std::sort(gbps.begin(), gbps.end());
    printf("{\"threads\": %d, \"MiB\": %zu, \"reps\": %d, \"pages\": \"%s\", \"median_GBps\": %.2f, "
           "\"best_GBps\": %.2f}\n",
           t, mib, reps, huge ? "huge" : "4k", gbps[gbps.size() / 2], gbps.back());
  }
  free(buf);
  return sink == 42 ? 1 : 0;
}
