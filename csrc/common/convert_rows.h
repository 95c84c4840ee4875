// Runs of floats between fp32 and a storage DType (kFloat32, kBFloat16, kFloat16), bit for
// bit what load_float / store_float give element by element (round to nearest even, NaN a
// quiet NaN as f32_to_f16 / f32_to_bf16 make it), 16 at a time with AVX-512 (F16C for
// fp16) when `vec`. Callers decide `vec` once per call with convert_vec(): it reads
// LLMCORE_CPU_ISA. Framework-free.
#pragma once

#include <stdint.h>

#include "common/dtype.h"

namespace llmcore {

// Whether the vector forms may run: the CPU has AVX-512F/BW/VL and F16C and LLMCORE_CPU_ISA
// allows AVX-512.
bool convert_vec();

// dst[i] = load_float(src, t, i) for i < n.
void widen_floats(const void* src, DType t, int64_t n, float* dst, bool vec);

// store_float(dst, t, i, src[i]) for i < n.
void narrow_floats(const float* src, DType t, int64_t n, void* dst, bool vec);

}  // namespace llmcore
