// llmcore::decoder_layers on the CPU: every block of a Llama-family decoder for a few new
// tokens over a KV cache, in one op call. The loop is the one Transformer._hidden_fused
// runs in Python (csrc/ops.cpp gives the contract), calling the same kernels with the same
// arguments, so its result is bit for bit that path's; what it removes is the Python
// between the kernels (~0.25 ms per layer per token on a 2-core Xeon: module lookups,
// argument checks, one dispatch per op), which is most of a small model's decode step.
//
// The sub-ops are called through the dispatcher (typed handles found once), so each keeps
// its own checks and threading; a failure names the layer and projection it came from.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <string>

#include "common/check.h"
#include "fused/decoder_layers.h"

namespace llmcore {
namespace fused {
namespace {
using OptT = std::optional<at::Tensor>;
const char* const kNames[kLinears] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"};
}  // namespace

DecoderWeights::DecoderWeights(std::vector<at::Tensor> norm_weight, double eps_,
                               const c10::List<OptT>& linear, std::vector<int64_t> spec,
                               int64_t heads, int64_t kv_heads)
    : norm(std::move(norm_weight)), eps(eps_), n_heads(heads), n_kv_heads(kv_heads) {
  const int64_t n_norms = static_cast<int64_t>(norm.size());
  LLMCORE_CHECK(n_norms >= 3 && n_norms % 2 == 1, "norm_weight must hold 2 * layers + 1 "
                "weights (each layer's input and post-attention norms, then the final "
                "norm), got ", n_norms);
  const int64_t L = (n_norms - 1) / 2;
  LLMCORE_CHECK(static_cast<int64_t>(linear.size()) == L * kLinears * kTensors,
                "linear must hold ", L * kLinears * kTensors, " entries (", kTensors,
                " for each of q, k, v, o, gate, up, down in ", L, " layers), got ",
                linear.size());
  LLMCORE_CHECK(static_cast<int64_t>(spec.size()) == L * kLinears * kSpec,
                "linear_spec must hold ", L * kLinears * kSpec, " ints (", kSpec,
                " per linear), got ", spec.size());
  LLMCORE_CHECK(n_heads >= 1 && n_kv_heads >= 1 && n_heads % n_kv_heads == 0,
                "n_heads must be a positive multiple of n_kv_heads, got ", n_heads, " and ",
                n_kv_heads);
  layers.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < kLinears; ++j) {
      const int64_t i = l * kLinears + j;
      Linear& lin = layers[static_cast<size_t>(l)][static_cast<size_t>(j)];
      lin.kind = spec[i * kSpec];
      lin.a_bits = spec[i * kSpec + 1];
      lin.w_bits = spec[i * kSpec + 2];
      lin.block = spec[i * kSpec + 3];
      const OptT w = linear.get(i * kTensors), e = linear.get(i * kTensors + 1);
      lin.bias = linear.get(i * kTensors + 2);
      LLMCORE_CHECK(lin.kind >= kDense && lin.kind <= kIntAct, "linear_spec of layer ", l, " ",
                    kNames[j], ": kind must be 0 (dense), 1 (BFP weight-only) or 2 (BFP "
                    "int8 activations), got ", lin.kind);
      LLMCORE_CHECK(w.has_value(), "linear of layer ", l, " ", kNames[j],
                    ": the weight is None");
      LLMCORE_CHECK(lin.kind == kDense || e.has_value(), "linear of layer ", l, " ",
                    kNames[j], ": a BFP weight needs its exponent, got None");
      lin.w = *w;
      if (e.has_value()) lin.e = *e;
    }
}

}  // namespace fused

namespace {

using fused::DecoderWeights;
using fused::kDense;
using fused::kIntAct;
using fused::kLinears;
using fused::kWeightOnly;
using fused::kNames;
using fused::Linear;
using OptT = std::optional<at::Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("llmcore::rms_norm");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>
      add_rms_norm = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, double)>(
          "llmcore::add_rms_norm");
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>
      rope = op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "llmcore::rope_");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)> silu_mul =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("llmcore::silu_mul");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&)>
      linear_gemv = op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&)>(
          "llmcore::linear_gemv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, const OptT&)>
      bfp_linear = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 int64_t, const OptT&)>("llmcore::bfp_linear");
  c10::TypedOperatorHandle<std::vector<at::Tensor>(const at::Tensor&, at::TensorList,
                                                   at::TensorList, int64_t, int64_t, int64_t,
                                                   bool, const c10::List<OptT>&)>
      act_linear_multi =
          op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, int64_t,
                                     int64_t, int64_t, bool, const c10::List<OptT>&)>(
              "llmcore::bfp_act_linear_multi");
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                                const OptT&)>
      append = op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const OptT&, const OptT&, const OptT&)>(
          "llmcore::kv_cache_append");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
      const OptT&, const OptT&, const OptT&)>
      attend = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, double,
                                                     const OptT&, const OptT&, const OptT&)>(
          "llmcore::decode_attention");
};

const Ops& ops() {
  static const Ops o;
  return o;
}

// Whether a dense projection takes linear_gemv, as Transformer's inference paths decide
// (llmcore.ops.dense.gemv_applies): at most 16 rows, one dtype, rows contiguous.
bool gemv_applies(const Linear& l, const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows <= 16 && l.w.dim() == 2 && l.w.scalar_type() == x.scalar_type() &&
         (l.w.stride(1) == 1 || l.w.size(1) <= 1) &&
         (!l.bias.has_value() || l.bias->scalar_type() == x.scalar_type());
}

at::Tensor apply(const Linear& l, const at::Tensor& x) {
  const Ops& o = ops();
  switch (l.kind) {
    case kDense:
      return gemv_applies(l, x) ? o.linear_gemv.call(x, l.w, l.bias) : at::linear(x, l.w, l.bias);
    case kWeightOnly: {  // a 2-D op, as bfp_linear's Python face calls it
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = l.w.size(0);
      return o.bfp_linear.call(x.reshape({-1, x.size(-1)}), l.w, l.e, l.w_bits, l.block, l.bias)
          .view(shape);
    }
    default: {
      c10::List<OptT> b;
      b.push_back(l.bias);
      return o.act_linear_multi.call(x, {l.w}, {l.e}, l.a_bits, l.w_bits, l.block, false, b)[0];
    }
  }
}

// Several projections of one input (q/k/v, gate/up): one bfp_act_linear_multi call (x
// quantised once) when all take int8 activations in one format, as
// bfp_linears_shared_input does; else one call each.
template <size_t N>
std::array<at::Tensor, N> apply_shared(const std::array<Linear, N>& ls, const at::Tensor& x) {
  std::array<at::Tensor, N> out;
  bool multi = true;
  for (const Linear& l : ls)
    multi = multi && l.kind == kIntAct && l.a_bits == ls[0].a_bits && l.w_bits == ls[0].w_bits &&
            l.block == ls[0].block;
  if (multi) {
    std::vector<at::Tensor> m, e;
    c10::List<OptT> b;
    for (const Linear& l : ls) {
      m.push_back(l.w);
      e.push_back(l.e);
      b.push_back(l.bias);
    }
    std::vector<at::Tensor> y = ops().act_linear_multi.call(x, m, e, ls[0].a_bits, ls[0].w_bits,
                                                            ls[0].block, false, b);
    for (size_t i = 0; i < N; ++i) out[i] = std::move(y[i]);
    return out;
  }
  for (size_t i = 0; i < N; ++i) out[i] = apply(ls[i], x);
  return out;
}

at::Tensor decoder_layers_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const c10::intrusive_ptr<DecoderWeights>& weights,
                              const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const OptT& k_exponent, const OptT& v_exponent,
                              const at::Tensor& cache_seqlens, const OptT& block_table,
                              double softmax_scale) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  CHECK_DIM(x, 3);
  const DecoderWeights& wts = *weights;
  const int64_t L = wts.n_layers(), n_heads = wts.n_heads, n_kv_heads = wts.n_kv_heads;
  const double eps = wts.eps;
  const std::vector<at::Tensor>& norm_weight = wts.norm;
  LLMCORE_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes() &&
                    k_cache.size(0) == L,
                "k_cache and v_cache must be [layers=", L, ", ...] of one shape, got ",
                shape_str(k_cache.sizes()), " and ", shape_str(v_cache.sizes()));
  LLMCORE_CHECK(k_exponent.has_value() == v_exponent.has_value(),
                "k_exponent and v_exponent must both be given (MXINT8 cache) or both None");
  CHECK_DEVICE(cache_seqlens, at::Device(at::kCPU));
  CHECK_DTYPE(cache_seqlens, at::kInt);
  const int64_t B = x.size(0), T = x.size(1), D = k_cache.size(4);

  const Ops& o = ops();
  const at::Tensor seq_end = cache_seqlens + T;  // lengths including the new tokens
  at::Tensor res = x;
  at::Tensor h = o.rms_norm.call(x, norm_weight[0], eps);
  for (int64_t l = 0; l < L; ++l) {
    const char* where = "";
    try {
      const std::array<Linear, kLinears>& lin = wts.layers[static_cast<size_t>(l)];
      where = "q_proj/k_proj/v_proj";
      auto [q, k, v] = apply_shared<3>({lin[0], lin[1], lin[2]}, h);
      q = q.view({B, T, n_heads, -1});
      k = k.view({B, T, n_kv_heads, -1});
      v = v.view({B, T, n_kv_heads, -1});
      where = "rope";
      o.rope.call(q, k, cos, sin);
      where = "the KV cache";
      const at::Tensor kc = k_cache.select(0, l), vc = v_cache.select(0, l);
      OptT ke, ve;
      if (k_exponent.has_value()) {
        ke = k_exponent->select(0, l);
        ve = v_exponent->select(0, l);
      }
      o.append.call(kc, vc, k, v, cache_seqlens, block_table, ke, ve);
      at::Tensor att =
          std::get<0>(o.attend.call(q, kc, vc, seq_end, softmax_scale, block_table, ke, ve));
      where = "o_proj";
      at::Tensor a = apply(lin[3], att.reshape({B, T, n_heads * D}));
      where = "post_attention_layernorm";
      std::tie(res, h) = o.add_rms_norm.call(res, a, norm_weight[2 * l + 1], eps);
      where = "gate_proj/up_proj";
      auto [g, u] = apply_shared<2>({lin[4], lin[5]}, h);
      where = "down_proj";
      at::Tensor d = apply(lin[6], o.silu_mul.call(g, u));
      where = "the next norm";
      std::tie(res, h) = o.add_rms_norm.call(res, d, norm_weight[2 * l + 2], eps);
    } catch (c10::Error& err) {
      err.add_context(std::string("in decoder_layers, layer ") + std::to_string(l) +
                      (where[0] ? std::string(", ") + where : std::string()));
      throw;
    }
  }
  return h;
}

}  // namespace
}  // namespace llmcore

// The class, then the schema that names it, then the kernel: static registrations run in
// the order they are written within a file (csrc/ops.cpp describes the op's contract).
TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  m.class_<llmcore::fused::DecoderWeights>("DecoderWeights")
      .def(torch::init<std::vector<at::Tensor>, double,
                       const c10::List<std::optional<at::Tensor>>&, std::vector<int64_t>,
                       int64_t, int64_t>())
      .def("n_layers", &llmcore::fused::DecoderWeights::n_layers);
  m.def("decoder_layers(Tensor x, Tensor cos, Tensor sin,"
        " __torch__.torch.classes.llmcore.DecoderWeights weights, Tensor(a!) k_cache,"
        " Tensor(b!) v_cache, Tensor(c!)? k_exponent, Tensor(d!)? v_exponent,"
        " Tensor cache_seqlens, Tensor? block_table, float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("decoder_layers", &llmcore::decoder_layers_cpu);
}
