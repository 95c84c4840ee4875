// The totals behind StepClock (step_profile.h) and llmcore::decode_profile, a catch-all
// function (no tensors, no dispatch key; csrc/ops.cpp gives the contract).
#include "fused/step_profile.h"

#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <vector>

namespace llmcore {
namespace fused {
namespace {

struct Totals {
  std::atomic<bool> on{false};
  std::mutex m;
  double seconds[kStepParts] = {};
  int64_t layer_calls = 0, steps = 0;
};

Totals& totals() {
  static Totals t;
  return t;
}

// [seconds of each part..., decoder_layers calls, greedy_decode steps, enabled (0 or 1)];
// `enable` (when given) switches collection on or off after reading, `reset` zeroes the
// totals after reading.
std::vector<double> decode_profile(std::optional<bool> enable, bool reset) {
  Totals& t = totals();
  std::vector<double> out;
  {
    std::lock_guard<std::mutex> lock(t.m);
    out.assign(t.seconds, t.seconds + kStepParts);
    out.push_back(static_cast<double>(t.layer_calls));
    out.push_back(static_cast<double>(t.steps));
    out.push_back(t.on.load() ? 1.0 : 0.0);
    if (reset) {
      for (double& s : t.seconds) s = 0.0;
      t.layer_calls = t.steps = 0;
    }
  }
  if (enable.has_value()) t.on.store(*enable);
  return out;
}

}  // namespace

bool step_profile_on() { return totals().on.load(std::memory_order_relaxed); }

void step_profile_add(const double* seconds, int64_t layer_calls, int64_t steps) {
  Totals& t = totals();
  std::lock_guard<std::mutex> lock(t.m);
  for (int p = 0; p < kStepParts; ++p) t.seconds[p] += seconds[p];
  t.layer_calls += layer_calls;
  t.steps += steps;
}

}  // namespace fused
}  // namespace llmcore

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  m.def("decode_profile(bool? enable=None, bool reset=False) -> float[]",
        &llmcore::fused::decode_profile);
}
