// Run-time choice of the CPU kernels' instruction set, shared by every op family: what
// the CPU supports (detected once) and the ceiling the environment variable
// LLMCORE_CPU_ISA=scalar|avx2|avx512 sets (read on each call, for tests that run every
// path). Each family decides from these which of its paths to run (its active_isa()).
// Framework-free.
#pragma once

namespace llmcore {

// Ordered: a lower value never needs more of the CPU.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Features the CPU kernels test for (all false off x86-64).
struct CpuFeatures {
  bool avx2, fma, f16c;
  bool avx512f, avx512bw, avx512vl, avx512vnni, avx512bf16;
};
const CpuFeatures& cpu_features();

// The highest ISA LLMCORE_CPU_ISA allows: kAvx512 when it is unset, empty or unknown.
Isa isa_limit();

// The path to run for a family whose best path on this CPU is `best`: `best` lowered to
// isa_limit(); under the avx2 limit a family without an AVX2 path (has_avx2 false) runs
// its scalar path.
Isa choose_isa(Isa best, bool has_avx2);

const char* isa_name(Isa isa);

}  // namespace llmcore
