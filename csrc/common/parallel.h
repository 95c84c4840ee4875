// Dynamic work sharing over torch's intra-op threads, for the per-token CPU ops (decode
// GEMVs, decode attention): raw callbacks over index ranges, no tensors.
//
// f(i0, i1) runs over [0, n) in chunks of `chunk`, handed out one at a time to the
// threads as they come: a thread that is descheduled because another process holds its
// core only delays its current chunk, where a static split (at::parallel_for) would make
// the call wait for its whole share.
//
// Still, the call returns only once every thread has looked in, and a thread that finds
// the work all done had no core for the whole call: then the next calls run on the
// calling thread alone (16, 32, ... up to 4096 of them while it keeps happening) before
// trying the other threads again. On an idle machine threads arrive in microseconds and
// this never triggers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace llmcore {

struct ThreadBackoff {
  std::atomic<int64_t> serial_calls{0};
  std::atomic<int> level{0};
};

inline ThreadBackoff& thread_backoff() {
  static ThreadBackoff b;
  return b;
}

template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t tasks = (n + chunk - 1) / chunk;
  int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  ThreadBackoff& bo = thread_backoff();
  if (threads > 1 && bo.serial_calls.load(std::memory_order_relaxed) > 0) {
    bo.serial_calls.fetch_sub(1, std::memory_order_relaxed);
    threads = 1;
  }
  if (threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> late{false};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t) {
    int64_t t = next.fetch_add(1);
    if (t >= tasks && begin != 0) late.store(true, std::memory_order_relaxed);
    for (; t < tasks; t = next.fetch_add(1)) f(t * chunk, std::min(n, (t + 1) * chunk));
  });
  if (late.load(std::memory_order_relaxed)) {
    const int lvl = std::min(bo.level.load(std::memory_order_relaxed) + 1, 9);
    bo.level.store(lvl, std::memory_order_relaxed);
    bo.serial_calls.store(int64_t{8} << lvl, std::memory_order_relaxed);
  } else {
    bo.level.store(0, std::memory_order_relaxed);
  }
}

}  // namespace llmcore
