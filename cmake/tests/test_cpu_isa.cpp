// Native checks of csrc/common/cpu_isa.h: the LLMCORE_CPU_ISA ceiling (scalar, avx2,
// avx512; unset, empty or unknown: no ceiling) and how a kernel family's best path is
// lowered to it, with and without an AVX2 path of its own.
// Built and run by cmake/CMakeLists.txt (ctest), optionally under ASan/UBSan.
#include <stdio.h>
#include <stdlib.h>

#include <initializer_list>

#include "common/cpu_isa.h"

using llmcore::Isa;

static int g_failures = 0;

static void expect(Isa got, Isa want, const char* what) {
  if (got != want) {
    ++g_failures;
    fprintf(stderr, "%s: got %s, want %s\n", what, llmcore::isa_name(got),
            llmcore::isa_name(want));
  }
}

static void with_env(const char* value) {
  if (value) setenv("LLMCORE_CPU_ISA", value, 1);
  else unsetenv("LLMCORE_CPU_ISA");
}

int main() {
  struct Case {
    const char* env;
    Isa limit;
  } cases[] = {{nullptr, Isa::kAvx512}, {"", Isa::kAvx512},      {"avx512", Isa::kAvx512},
               {"bogus", Isa::kAvx512}, {"avx2", Isa::kAvx2},    {"scalar", Isa::kScalar}};
  for (const Case& c : cases) {
    with_env(c.env);
    expect(llmcore::isa_limit(), c.limit, c.env ? c.env : "(unset)");
    // A family with an AVX2 path runs min(best, limit).
    for (Isa best : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      const Isa want = static_cast<int>(c.limit) < static_cast<int>(best) ? c.limit : best;
      expect(llmcore::choose_isa(best, true), want, "choose_isa(best, has_avx2)");
    }
    // One without (AVX-512 or scalar) runs scalar under the avx2 ceiling.
    expect(llmcore::choose_isa(Isa::kAvx512, false),
           c.limit == Isa::kAvx512 ? Isa::kAvx512 : Isa::kScalar, "choose_isa(avx512, no avx2)");
    expect(llmcore::choose_isa(Isa::kScalar, false), Isa::kScalar, "choose_isa(scalar, no avx2)");
  }
  with_env(nullptr);
  // Detection is stable and consistent: AVX-512 BW/VL/VNNI/BF16 come with AVX-512F.
  const llmcore::CpuFeatures& f = llmcore::cpu_features();
  if (&f != &llmcore::cpu_features()) ++g_failures;
  if (!f.avx512f && (f.avx512bw || f.avx512vl || f.avx512vnni || f.avx512bf16)) {
    ++g_failures;
    fprintf(stderr, "AVX-512 extensions reported without AVX-512F\n");
  }
  if (g_failures) {
    fprintf(stderr, "test_cpu_isa: %d failure(s)\n", g_failures);
    return 1;
  }
  printf("test_cpu_isa: all checks passed\n");
  return 0;
}
