// Host-side set-up of a CUDA kernel done once per (kernel, device) rather than per launch:
// the opt-in to more than 48 KB of dynamic shared memory (cudaFuncSetAttribute) and the
// occupancy query. Both are per-device properties of a kernel: a process that uses two GPUs
// sets each up once. No torch; thread-safe (a mutex around a small table, one entry per
// kernel and device actually used: a few dozen at most).
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <vector>

namespace llmcore {
namespace cuda_setup {

namespace detail {

struct Entry {
  const void* fn;
  int device;
  int smem_set;   // the largest dynamic shared memory size set so far (0: none)
  int occ_threads, occ_smem, occ_blocks;  // the last occupancy query (occ_threads 0: none)
};

inline std::mutex& mutex() {
  static std::mutex m;
  return m;
}

inline std::vector<Entry>& table() {
  static std::vector<Entry> t;
  return t;
}

// The entry of (fn, device), created if absent; call with mutex() held.
inline Entry& entry(const void* fn, int device) {
  for (Entry& e : table())
    if (e.fn == fn && e.device == device) return e;
  table().push_back(Entry{fn, device, 0, 0, 0, 0});
  return table().back();
}

}  // namespace detail

// Ensures `fn` may launch with `bytes` of dynamic shared memory on the current device;
// calls cudaFuncSetAttribute only the first time a (kernel, device) needs a size above 48 KB
// (or a larger size than set before). Returns the error of that call, cudaSuccess after.
template <typename Kernel>
cudaError_t ensure_dynamic_smem(Kernel fn, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(fn);
  std::lock_guard<std::mutex> lock(detail::mutex());
  detail::Entry& e = detail::entry(key, device);
  if (e.smem_set >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) e.smem_set = bytes;
  return err;
}

// Resident CTAs of `fn` per SM on the current device at `threads` per CTA and `smem` bytes of
// dynamic shared memory (set up as ensure_dynamic_smem does); cached per (kernel, device,
// threads, smem).
template <typename Kernel>
cudaError_t occupancy_blocks_per_sm(Kernel fn, int threads, int smem, int* blocks) {
  cudaError_t err = ensure_dynamic_smem(fn, smem);
  if (err != cudaSuccess) return err;
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(fn);
  std::lock_guard<std::mutex> lock(detail::mutex());
  detail::Entry& e = detail::entry(key, device);
  if (e.occ_threads == threads && e.occ_smem == smem) {
    *blocks = e.occ_blocks;
    return cudaSuccess;
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, fn, threads, smem);
  if (err == cudaSuccess) {
    e.occ_threads = threads;
    e.occ_smem = smem;
    e.occ_blocks = *blocks;
  }
  return err;
}

// The SM count of `device`, cached.
inline cudaError_t multiprocessor_count(int device, int* sms) {
  static std::mutex m;
  static std::vector<int> counts;  // by device index; 0: not read yet
  if (device < 0) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(m);
  if (static_cast<size_t>(device) < counts.size() && counts[device] > 0) {
    *sms = counts[device];
    return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (counts.size() <= static_cast<size_t>(device)) counts.resize(device + 1, 0);
  counts[device] = *sms;
  return cudaSuccess;
}

}  // namespace cuda_setup
}  // namespace llmcore
