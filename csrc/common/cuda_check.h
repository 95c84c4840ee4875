// Shared by the CUDA torch bindings: device checks, launch-error checks, the current stream.
// The stream comes from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h, which
// needs the cuBLAS/cuSPARSE headers (absent from some toolkits used for the compile check).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/check.h"

#define CHECK_CUDA(x) \
  TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())

#define CHECK_SAME_DEVICE(x, y)                                                                 \
  TORCH_CHECK_VALUE((x).device() == (y).device(), #x " and " #y " must be on one device, got ", \
                    (x).device(), " and ", (y).device())

#define CHECK_LAUNCH(err, op)                                                              \
  TORCH_CHECK((err) == cudaSuccess, "llmcore::" op " CUDA kernel failed: ",                \
              cudaGetErrorString(err))

namespace llmcore {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace llmcore
