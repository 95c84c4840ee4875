// Helper threads for memory-bound calls on a shared machine (the decode GEMVs): a call is
// cut into chunks that the calling thread and up to `threads - 1` helpers take one at a
// time, and it returns as soon as every chunk is done. Unlike an OpenMP parallel region
// there is no arrival barrier: a helper whose core is held by another process and that
// wakes up late finds no work left and costs the call nothing, so a busy core slows a call
// down to the one-thread time at worst, where a barrier waits for the descheduled thread
// (measured: 1.0 ms -> 3.8 ms per call at 2 threads with libgomp's default spinning).
//
// Helpers spin for a short while after their last chunk (decode issues GEMVs back to back)
// and then sleep on a futex (std::atomic::wait). Calls from several threads at once are
// safe: one runs on the helpers, the others on their own thread. Framework-free.
#pragma once

#include <stdint.h>

namespace llmcore {

// f(ctx, begin, end) over [0, n) in chunks of `chunk` (the last one shorter), on the
// calling thread and up to threads - 1 helper threads. Returns when all chunks are done.
void run_chunks(int64_t n, int64_t chunk, int threads, void (*f)(void*, int64_t, int64_t),
                void* ctx);

template <typename F>
void run_chunks(int64_t n, int64_t chunk, int threads, const F& f) {
  run_chunks(n, chunk, threads,
             [](void* c, int64_t b, int64_t e) { (*static_cast<const F*>(c))(b, e); },
             const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace llmcore
