// Dynamic work sharing over torch's intra-op thread count, for the per-token CPU ops
// (decode GEMVs, decode attention): raw callbacks over index ranges, no tensors.
//
// f(i0, i1) runs over [0, n) in chunks of `chunk`, handed out one at a time to the calling
// thread and torch.get_num_threads() - 1 helper threads as they come (common/chunk_pool.h):
// there is no arrival barrier, so a thread whose core another process holds delays the
// call by at most the chunk in its hands, where a static split (at::parallel_for) would
// make the call wait for its whole share. Inside a parallel region it runs inline.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/chunk_pool.h"

namespace llmcore {

// Weight bytes per task of a decode GEMV that streams `total` bytes of weight: about a
// quarter of one thread's share, and at least 32 KB (taking a task costs nothing next to
// that). Each thread then streams long runs of adjacent bytes: with 32 KB tasks the two
// threads of a 2-core VM took alternate tasks, and the 2-thread GEMVs ran 1.06-1.63x
// slower (AMD EPYC, benchmarks/results/cpu-amd-epyc/gemv_chunks.json); a thread whose
// core another process holds still delays the call by one task only.
// LLMCORE_GEMV_TASK_KB=n fixes the tasks at n KB instead (A/B runs: 32 is the old rule).
inline int64_t gemv_task_bytes(int64_t total) {
  constexpr int64_t kMinBytes = int64_t{32} << 10, kTasksPerThread = 4;
  static const int64_t fixed = [] {
    const char* v = std::getenv("LLMCORE_GEMV_TASK_KB");
    return v ? std::max<int64_t>(1, std::atoll(v)) << 10 : int64_t{0};
  }();
  if (fixed) return fixed;
  return std::max<int64_t>(kMinBytes,
                           total / (kTasksPerThread * std::max(1, at::get_num_threads())));
}

template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  if (at::in_parallel_region()) {
    f(0, n);
    return;
  }
  run_chunks(n, std::max<int64_t>(1, chunk), at::get_num_threads(), f);
}

// The work of a compute kernel (prefill GEMMs and their packing, attention forward,
// quantisation) over [0, n), at least `grain` items per thread as at::parallel_for.
// Under torch.inference_mode it runs on llmcore's helpers (run_chunks, a few chunks per
// thread), elsewhere on torch's OpenMP threads. Inference runs llmcore's kernels back to
// back, and libgomp's workers spin for milliseconds after each parallel region: one
// OpenMP region among them (the prefill's attention) left a worker spinning on the
// second core while the helper needed it, and 110M MXINT4 prefill of 128 tokens at 2
// threads ran at 1130-1260 tok/s against 1720-1930 with the workers asleep
// (OMP_WAIT_POLICY=PASSIVE; AMD EPYC VM, 2 cores). Training runs torch's ops around
// llmcore's (and autograd's backward, and a custom Function's forward, run with grad
// off, never in inference mode), so there torch's threads are the ones already awake.
// LLMCORE_CPU_POOL=openmp keeps torch's threads in inference too (A/B runs).
inline bool openmp_pool_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("LLMCORE_CPU_POOL");
    return v != nullptr && std::string(v) == "openmp";
  }();
  return forced;
}

template <typename F>
void parallel_items(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (!c10::InferenceMode::is_enabled() || at::in_parallel_region() || openmp_pool_forced()) {
    at::parallel_for(0, n, grain, f);
    return;
  }
  constexpr int64_t kChunksPerThread = 4;
  const int threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(
      grain, (n + kChunksPerThread * threads - 1) / (kChunksPerThread * threads));
  run_chunks(n, chunk, threads, f);
}

}  // namespace llmcore
