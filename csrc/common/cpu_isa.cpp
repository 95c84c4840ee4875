// CPU feature detection and the LLMCORE_CPU_ISA ceiling (see cpu_isa.h).
#include "common/cpu_isa.h"

#include <stdlib.h>
#include <string.h>

namespace llmcore {
namespace {

CpuFeatures detect() {
  CpuFeatures f{};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

Isa isa_limit() {
  const char* env = getenv("LLMCORE_CPU_ISA");
  if (env && !strcmp(env, "scalar")) return Isa::kScalar;
  if (env && !strcmp(env, "avx2")) return Isa::kAvx2;
  return Isa::kAvx512;
}

Isa choose_isa(Isa best, bool has_avx2) {
  const Isa limit = isa_limit();
  const Isa isa = static_cast<int>(limit) < static_cast<int>(best) ? limit : best;
  return isa == Isa::kAvx2 && !has_avx2 ? Isa::kScalar : isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace llmcore
