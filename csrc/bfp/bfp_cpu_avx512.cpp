// placeholder, replaced by the vectorised kernels
#include "bfp/bfp_cpu_internal.h"
namespace llmcore { namespace bfp { namespace cpu { namespace avx512 {
const Kernels kKernels = {nullptr, nullptr, nullptr, nullptr};
}}}}
