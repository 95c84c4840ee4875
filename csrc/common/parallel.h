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

#include <algorithm>
#include <cstdint>

#include "common/chunk_pool.h"

namespace llmcore {

template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  if (at::in_parallel_region()) {
    f(0, n);
    return;
  }
  run_chunks(n, std::max<int64_t>(1, chunk), at::get_num_threads(), f);
}

}  // namespace llmcore
