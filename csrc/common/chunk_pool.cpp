// run_chunks (chunk_pool.h). One job at a time is published in a single 64-bit word,
//   state = generation (24 bits) | tasks (20 bits) | next task (20 bits),
// and a task is claimed by a compare-and-swap that bumps `next` within the same
// generation; so whoever claims a task knows the job is still the current one, and the
// caller, which waits until `done` counts every task, keeps the job alive until all
// claimed tasks are finished. A helper that finds next == tasks (or a new generation) has
// nothing to do, and nothing waits for it.
#include "common/chunk_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define LLMCORE_PAUSE() _mm_pause()
#else
#define LLMCORE_PAUSE() std::this_thread::yield()
#endif

namespace llmcore {
namespace {

constexpr int kTaskBits = 20;
constexpr uint64_t kTaskMask = (uint64_t{1} << kTaskBits) - 1;
// How long a helper keeps looking for the next job before it sleeps: decode issues its
// GEMVs a few microseconds apart, and a futex wake-up costs about as much as a small GEMV.
constexpr auto kSpin = std::chrono::microseconds(100);

struct Job {
  void (*f)(void*, int64_t, int64_t);
  void* ctx;
  int64_t n, chunk;
};

struct Pool {
  std::atomic<uint64_t> state{0};
  std::atomic<int64_t> done{0};
  std::atomic<uint32_t> wake{0};
  std::atomic<int> sleepers{0};
  std::atomic<int> active{0};  // helpers [0, active) may take tasks of the current job
  std::atomic<bool> busy{false};
  Job job{};
  std::mutex start_mu;
  int started = 0;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: helpers are detached and outlive main()
  return *p;
}

inline uint64_t tasks_of(uint64_t s) { return (s >> kTaskBits) & kTaskMask; }
inline uint64_t next_of(uint64_t s) { return s & kTaskMask; }

// Claims one task of the current job; false when none is left.
bool run_one(Pool& p) {
  uint64_t s = p.state.load(std::memory_order_acquire);
  while (next_of(s) < tasks_of(s)) {
    if (p.state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      const Job& j = p.job;
      const int64_t b = static_cast<int64_t>(next_of(s)) * j.chunk;
      j.f(j.ctx, b, std::min(j.n, b + j.chunk));
      p.done.fetch_add(1, std::memory_order_release);
      return true;
    }
  }
  return false;
}

bool has_work(const Pool& p) {
  const uint64_t s = p.state.load(std::memory_order_relaxed);
  return next_of(s) < tasks_of(s);
}

void helper_main(Pool& p, int index) {
  for (;;) {
    const uint32_t seen = p.wake.load();
    if (index < p.active.load(std::memory_order_relaxed)) {
      while (run_one(p)) {
      }
    }
    const auto until = std::chrono::steady_clock::now() + kSpin;
    bool found = false;
    for (int i = 0; !found; ++i) {
      if (index < p.active.load(std::memory_order_relaxed) && has_work(p)) found = true;
      else if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
      else LLMCORE_PAUSE();
    }
    if (found) continue;
    p.sleepers.fetch_add(1);
    p.wake.wait(seen);  // returns at once if a job was published since `seen`
    p.sleepers.fetch_sub(1);
  }
}

void ensure_helpers(Pool& p, int helpers) {
  std::lock_guard<std::mutex> lock(p.start_mu);
  for (; p.started < helpers; ++p.started) {
    std::thread(helper_main, std::ref(p), p.started).detach();
  }
}

}  // namespace

void run_chunks(int64_t n, int64_t chunk, int threads, void (*f)(void*, int64_t, int64_t),
                void* ctx) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, (n + static_cast<int64_t>(kTaskMask) - 1) /
                                       static_cast<int64_t>(kTaskMask));
  const int64_t tasks = (n + chunk - 1) / chunk;
  Pool& p = pool();
  if (threads <= 1 || tasks <= 1 || p.busy.exchange(true, std::memory_order_acquire)) {
    f(ctx, 0, n);  // one thread, one task, or another call holds the helpers
    return;
  }
  const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, tasks - 1));
  ensure_helpers(p, helpers);
  p.job = Job{f, ctx, n, chunk};
  p.done.store(0, std::memory_order_relaxed);
  p.active.store(helpers, std::memory_order_relaxed);
  const uint64_t gen = (p.state.load(std::memory_order_relaxed) >> (2 * kTaskBits)) + 1;
  p.state.store((gen << (2 * kTaskBits)) | (static_cast<uint64_t>(tasks) << kTaskBits),
                std::memory_order_release);
  p.wake.fetch_add(1);
  if (p.sleepers.load() > 0) p.wake.notify_all();
  while (run_one(p)) {
  }
  // Only tasks that helpers have claimed are left: wait for those.
  while (p.done.load(std::memory_order_acquire) < tasks) LLMCORE_PAUSE();
  p.busy.store(false, std::memory_order_release);
}

}  // namespace llmcore
