// The element types of the kernels' buffers: one enum for every op family and device.
// Framework-free; the torch bindings convert with to_dtype() (common/check.h), the only
// place that knows c10's ScalarType.
#pragma once

namespace llmcore {

// kInt8 holds mantissas: of an MXINT8 KV cache (with E8M0 exponents beside it).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

constexpr int dtype_size(DType t) {
  return t == DType::kFloat32 ? 4 : (t == DType::kInt8 ? 1 : 2);
}

}  // namespace llmcore
