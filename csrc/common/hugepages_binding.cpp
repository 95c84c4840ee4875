// llmcore::hugepage_arena and llmcore::arena_view (csrc/ops.cpp gives the contract): host
// memory in 2 MB pages for the tensors a decode step streams (weights, KV cache).
//
// Why: a decode step reads every weight byte once, and on 4 KB pages the hardware
// prefetchers stop at each page boundary and every page costs a TLB miss. A streaming read
// on the AMD EPYC VM of this project ran at 17-19 GB/s on one thread and 23-27 GB/s on two
// from 4 KB pages, 27-30 and 32-33 GB/s from transparent huge pages (benchmarks/membw.cpp
// with its "huge" argument). torch's CPU allocator asks for huge pages only when
// THP_MEM_ALLOC_ENABLE is set before torch loads, and only for allocations of 2 MB or more
// (most projection weights of a small model are below that), so llmcore maps its own
// arena: an anonymous private mapping aligned to 2 MB and advised MADV_HUGEPAGE (which the
// kernel honours when /sys/kernel/mm/transparent_hugepage/enabled is "always" or
// "madvise"; elsewhere the arena is ordinary memory and everything still works).
//
// arena_view gives each tensor placed in an arena its own storage (a from_blob pointer
// into the arena that holds the arena's storage alive), so tensors packed side by side do
// not look like views of one storage to code that checks for shared storage (safetensors'
// save, torch.save's dedup); the arena's memory goes back when its last view is freed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cerrno>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/check.h"

namespace llmcore {
namespace {

constexpr int64_t kHugePage = int64_t{2} << 20;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

at::Tensor hugepage_arena(int64_t nbytes) {
  LLMCORE_CHECK(nbytes >= 0, "hugepage_arena: nbytes must be >= 0, got ", nbytes);
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
#if defined(__linux__)
  if (nbytes == 0) return at::empty({0}, opts);
  LLMCORE_CHECK(nbytes <= (int64_t{1} << 46), "hugepage_arena: nbytes (", nbytes,
                ") is beyond any machine's memory");
  // Map one huge page more than needed so the start can be aligned to 2 MB.
  const size_t len = static_cast<size_t>(round_up(nbytes, kHugePage) + kHugePage);
  void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "hugepage_arena: mmap of ", len, " bytes failed: ",
              std::strerror(errno));
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  char* start = reinterpret_cast<char*>(round_up(static_cast<int64_t>(b), kHugePage));
#if defined(MADV_HUGEPAGE)
  // Advice, not a request that can fail the call: without THP the pages stay 4 KB.
  (void)madvise(start, static_cast<size_t>(round_up(nbytes, kHugePage)), MADV_HUGEPAGE);
#endif
  return at::from_blob(
      start, {nbytes}, [base, len](void*) { munmap(base, len); }, opts);
#else
  return at::zeros({nbytes}, opts);  // no THP advice here: plain (zeroed) host memory
#endif
}

at::Tensor arena_view(const at::Tensor& arena, int64_t offset, at::IntArrayRef size,
                      at::IntArrayRef stride, at::ScalarType dtype) {
  CHECK_DEVICE(arena, at::Device(at::kCPU));
  CHECK_DTYPE(arena, at::kByte);
  LLMCORE_CHECK(arena.dim() == 1 && arena.is_contiguous(),
                "arena must be a 1-D contiguous uint8 tensor (hugepage_arena's), got shape ",
                shape_str(arena.sizes()), " strides ", shape_str(arena.strides()));
  LLMCORE_CHECK(size.size() == stride.size(), "size and stride must have one entry per "
                "dimension, got ", size.size(), " and ", stride.size());
  const int64_t esz = static_cast<int64_t>(c10::elementSize(dtype));
  LLMCORE_CHECK(offset >= 0 && offset % esz == 0, "offset must be a non-negative multiple of ",
                dtype_name(dtype), "'s ", esz, " bytes, got ", offset);
  int64_t extent = 1;  // elements from the first to one past the last, 0 when empty
  for (size_t d = 0; d < size.size(); ++d) {
    LLMCORE_CHECK(size[d] >= 0 && stride[d] >= 0, "size and stride must be >= 0, got size ",
                  shape_str(size), " stride ", shape_str(stride));
    if (size[d] == 0) extent = 0;
  }
  if (extent) {
    for (size_t d = 0; d < size.size(); ++d) extent += (size[d] - 1) * stride[d];
  }
  LLMCORE_CHECK(offset + extent * esz <= arena.numel(), "a ", dtype_name(dtype), " view of size ",
                shape_str(size), " stride ", shape_str(stride), " at byte ", offset,
                " ends at byte ", offset + extent * esz, ", past the arena's ", arena.numel());
  const c10::Storage keep = arena.storage();  // the view holds the arena's memory alive
  return at::from_blob(static_cast<uint8_t*>(arena.data_ptr()) + offset, size, stride,
                       [keep](void*) {}, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

}  // namespace
}  // namespace llmcore

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  m.def("hugepage_arena(int nbytes) -> Tensor", &llmcore::hugepage_arena);
  m.def("arena_view(Tensor arena, int offset, int[] size, int[] stride, ScalarType dtype)"
        " -> Tensor",
        &llmcore::arena_view);
}
