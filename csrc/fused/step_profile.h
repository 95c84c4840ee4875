// Where a CPU decode step's time goes inside llmcore::decoder_layers and
// llmcore::greedy_decode: wall time per part of the step (the projections, the attention,
// the small ops, the head), summed over calls while enabled (llmcore.ops.profile; the
// op llmcore::decode_profile in step_profile_binding.cpp). The torch profiler sees each
// of these ops as one event; this splits it. Off (the default), a part's timer is one
// branch.
#pragma once

#include <chrono>
#include <cstdint>

namespace llmcore {
namespace fused {

// The parts, in step order (llmcore/ops/profile.py names them the same way).
enum StepPart : int {
  kPartEmbed,      // greedy_decode: the embedding lookup and the RoPE rows of the step
  kPartNorms,      // the RMSNorms (the first one, and each residual add + norm)
  kPartQkv,        // q/k/v projections
  kPartRope,       // RoPE on q and k
  kPartKvAppend,   // writing k and v into the cache
  kPartAttention,  // decode attention over the cache
  kPartOProj,      // output projection
  kPartGateUp,     // gate/up projections
  kPartSiluMul,    // silu(gate) * up
  kPartDown,       // down projection
  kPartHead,       // greedy_decode: the output head
  kPartArgmax,     // greedy_decode: the pick and the step's bookkeeping
  kStepParts
};

bool step_profile_on();
// Adds one call's sums: seconds[kStepParts], decoder_layers calls, greedy_decode steps.
void step_profile_add(const double* seconds, int64_t layer_calls, int64_t steps);

// A stopwatch over one op call: lap(p) adds the time since the previous lap (or the
// start) to part p; flush() hands the sums to the totals. Whether it runs is decided when
// it is made (a call is timed whole or not at all).
class StepClock {
 public:
  StepClock() : on_(step_profile_on()) {
    if (on_) last_ = now();
  }
  void lap(StepPart p) {
    if (!on_) return;
    const double t = now();
    sec_[p] += t - last_;
    last_ = t;
  }
  void restart() {
    if (on_) last_ = now();
  }
  void flush(int64_t layer_calls, int64_t steps) {
    if (on_) step_profile_add(sec_, layer_calls, steps);
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  bool on_;
  double last_ = 0.0;
  double sec_[kStepParts] = {};
};

}  // namespace fused
}  // namespace llmcore
