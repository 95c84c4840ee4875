// DecoderWeights: the per-model arguments of llmcore::decoder_layers (csrc/ops.cpp),
// checked and unpacked once into a torch custom class (torch.classes.llmcore.DecoderWeights):
// a Python list of ~250 tensors converted on every step would cost more than a small
// model's kernels.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

namespace llmcore {
namespace fused {

// Per layer, seven linears in this order: q, k, v, o, gate, up, down.
constexpr int64_t kLinears = 7;
constexpr int64_t kSpec = 4;     // ints per linear: kind, a_bits, w_bits, block_size
constexpr int64_t kTensors = 3;  // tensors per linear: weight (or mantissa), exponent, bias
enum Kind : int64_t { kDense = 0, kWeightOnly = 1, kIntAct = 2 };

// One projection's tensors and spec.
struct Linear {
  int64_t kind = kDense, a_bits = 0, w_bits = 0, block = 0;
  at::Tensor w, e;
  std::optional<at::Tensor> bias;
};

// A Linear from its three tensors (weight or mantissa, exponent, bias) and kSpec ints, checked;
// errors start with `what`.
Linear make_linear(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& e,
                   std::optional<at::Tensor> bias, const int64_t* spec, const std::string& what);

// The per-model arguments of decoder_layers, checked and unpacked once (a Python list of
// ~250 tensors converted on every step would cost more than the layers' small kernels):
// torch.classes.llmcore.DecoderWeights(norm_weight, eps, linear, linear_spec, n_heads,
// n_kv_heads), the lists as csrc/ops.cpp describes them.
struct DecoderWeights : torch::CustomClassHolder {
  std::vector<at::Tensor> norm;
  double eps;
  std::vector<std::array<Linear, kLinears>> layers;
  int64_t n_heads, n_kv_heads;

  DecoderWeights(std::vector<at::Tensor> norm_weight, double eps,
                 const c10::List<std::optional<at::Tensor>>& linear, std::vector<int64_t> spec,
                 int64_t n_heads, int64_t n_kv_heads);

  int64_t n_layers() const { return static_cast<int64_t>(layers.size()); }
};

}  // namespace fused
}  // namespace llmcore
