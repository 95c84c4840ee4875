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

#include <algorithm>
#include <array>
#include <string>

#include "common/check.h"
#include "fused/decoder_layers.h"
#include "fused/step_profile.h"

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
      layers[static_cast<size_t>(l)][static_cast<size_t>(j)] = make_linear(
          linear.get(i * kTensors), linear.get(i * kTensors + 1), linear.get(i * kTensors + 2),
          &spec[static_cast<size_t>(i * kSpec)],
          "linear of layer " + std::to_string(l) + " " + kNames[j]);
    }
}

Linear make_linear(const OptT& w, const OptT& e, OptT bias, const int64_t* spec,
                   const std::string& what) {
  Linear lin;
  lin.kind = spec[0];
  lin.a_bits = spec[1];
  lin.w_bits = spec[2];
  lin.block = spec[3];
  lin.bias = std::move(bias);
  LLMCORE_CHECK(lin.kind >= kDense && lin.kind <= kIntAct, what, ": kind must be 0 (dense), "
                "1 (BFP weight-only) or 2 (BFP int8 activations), got ", lin.kind);
  LLMCORE_CHECK(w.has_value(), what, ": the weight is None");
  LLMCORE_CHECK(lin.kind == kDense || e.has_value(), what,
                ": a BFP weight needs its exponent, got None");
  lin.w = *w;
  if (e.has_value()) lin.e = *e;
  return lin;
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
using fused::StepClock;
using fused::kPartArgmax;
using fused::kPartAttention;
using fused::kPartDown;
using fused::kPartEmbed;
using fused::kPartGateUp;
using fused::kPartHead;
using fused::kPartKvAppend;
using fused::kPartNorms;
using fused::kPartOProj;
using fused::kPartQkv;
using fused::kPartRope;
using fused::kPartSiluMul;

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
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, int64_t, c10::ScalarType)>
      bfp_embedding = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    int64_t, int64_t, int64_t, c10::ScalarType)>(
          "llmcore::bfp_embedding");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> argmax_last =
      op<at::Tensor(const at::Tensor&)>("llmcore::argmax_last");
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
  StepClock clk;  // llmcore.ops.profile: per-part wall time, when switched on
  at::Tensor res = x;
  at::Tensor h = o.rms_norm.call(x, norm_weight[0], eps);
  clk.lap(kPartNorms);
  for (int64_t l = 0; l < L; ++l) {
    const char* where = "";
    try {
      const std::array<Linear, kLinears>& lin = wts.layers[static_cast<size_t>(l)];
      where = "q_proj/k_proj/v_proj";
      auto [q, k, v] = apply_shared<3>({lin[0], lin[1], lin[2]}, h);
      clk.lap(kPartQkv);
      q = q.view({B, T, n_heads, -1});
      k = k.view({B, T, n_kv_heads, -1});
      v = v.view({B, T, n_kv_heads, -1});
      where = "rope";
      o.rope.call(q, k, cos, sin);
      clk.lap(kPartRope);
      where = "the KV cache";
      const at::Tensor kc = k_cache.select(0, l), vc = v_cache.select(0, l);
      OptT ke, ve;
      if (k_exponent.has_value()) {
        ke = k_exponent->select(0, l);
        ve = v_exponent->select(0, l);
      }
      o.append.call(kc, vc, k, v, cache_seqlens, block_table, ke, ve);
      clk.lap(kPartKvAppend);
      at::Tensor att =
          std::get<0>(o.attend.call(q, kc, vc, seq_end, softmax_scale, block_table, ke, ve));
      clk.lap(kPartAttention);
      where = "o_proj";
      at::Tensor a = apply(lin[3], att.reshape({B, T, n_heads * D}));
      clk.lap(kPartOProj);
      where = "post_attention_layernorm";
      std::tie(res, h) = o.add_rms_norm.call(res, a, norm_weight[2 * l + 1], eps);
      clk.lap(kPartNorms);
      where = "gate_proj/up_proj";
      auto [g, u] = apply_shared<2>({lin[4], lin[5]}, h);
      clk.lap(kPartGateUp);
      where = "down_proj";
      const at::Tensor gu = o.silu_mul.call(g, u);
      clk.lap(kPartSiluMul);
      at::Tensor d = apply(lin[6], gu);
      clk.lap(kPartDown);
      where = "the next norm";
      std::tie(res, h) = o.add_rms_norm.call(res, d, norm_weight[2 * l + 2], eps);
      clk.lap(kPartNorms);
    } catch (c10::Error& err) {
      err.add_context(std::string("in decoder_layers, layer ") + std::to_string(l) +
                      (where[0] ? std::string(", ") + where : std::string()));
      throw;
    }
  }
  clk.flush(/*layer_calls=*/1, /*steps=*/0);
  return h;
}

// llmcore::greedy_decode (csrc/ops.cpp gives the contract): `steps` greedy decode steps of
// a whole model in one call. Each step is what Transformer.forward's cached CPU path and
// generate's greedy pick run for one token per sequence: the embedding lookup, the RoPE
// rows of the sequences' positions (from float32 tables, rounded to the model's dtype as
// Transformer.rope does), decoder_layers, the output head, argmax_last; then the token is
// replaced by `fill` in finished rows, a row finishes at one of `eos`, and the loop stops
// when every row has. The cache's k/v are written at cache_seqlens + step; cache_seqlens
// itself is left as it is (the caller commits the steps taken: the result's width).
at::Tensor greedy_decode_cpu(const at::Tensor& tokens, int64_t steps,
                             const c10::intrusive_ptr<DecoderWeights>& weights,
                             const at::Tensor& embed_weight, const OptT& embed_exponent,
                             int64_t embed_bits, int64_t embed_block, const c10::List<OptT>& head,
                             std::vector<int64_t> head_spec, const at::Tensor& rope_cos,
                             const at::Tensor& rope_sin, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const OptT& k_exponent,
                             const OptT& v_exponent, const at::Tensor& cache_seqlens,
                             const OptT& block_table, double softmax_scale,
                             std::vector<int64_t> eos, int64_t fill, const at::Tensor& done) {
  CHECK_DEVICE(tokens, at::Device(at::kCPU));
  CHECK_DTYPE(tokens, at::kLong);
  LLMCORE_CHECK(tokens.dim() == 1 || tokens.dim() == 2,
                "tokens must be [batch] or [batch, prefix], got shape ", shape_str(tokens.sizes()));
  const int64_t B = tokens.size(0), P = tokens.dim() == 2 ? tokens.size(1) : 1;
  LLMCORE_CHECK(B >= 1 && P >= 1, "tokens must hold at least one token per sequence, got shape ",
                shape_str(tokens.sizes()));
  LLMCORE_CHECK(steps >= 0, "steps must be >= 0, got ", steps);
  CHECK_DEVICE(cache_seqlens, at::Device(at::kCPU));
  CHECK_DTYPE(cache_seqlens, at::kInt);
  LLMCORE_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
                "cache_seqlens must be [", B, "] (one length per sequence of tokens), got ",
                shape_str(cache_seqlens.sizes()));
  CHECK_DEVICE(done, at::Device(at::kCPU));
  CHECK_DTYPE(done, at::kBool);
  LLMCORE_CHECK(done.dim() == 1 && done.size(0) == B, "done must be [", B, "], got ",
                shape_str(done.sizes()));
  const DecoderWeights& wts = *weights;
  const at::Tensor& final_norm = wts.norm.back();
  const c10::ScalarType dtype = final_norm.scalar_type();
  const int64_t dim = final_norm.size(0), D = k_cache.dim() == 5 ? k_cache.size(4) : 0;
  LLMCORE_CHECK(static_cast<int64_t>(head.size()) == fused::kTensors &&
                    static_cast<int64_t>(head_spec.size()) == fused::kSpec,
                "head must hold ", fused::kTensors, " entries and head_spec ", fused::kSpec,
                " ints (as one linear of DecoderWeights), got ", head.size(), " and ",
                head_spec.size());
  const Linear lm_head =
      fused::make_linear(head.get(0), head.get(1), head.get(2), head_spec.data(), "head");
  CHECK_DEVICE(rope_cos, at::Device(at::kCPU));
  CHECK_DTYPE(rope_cos, at::kFloat);
  CHECK_DEVICE(rope_sin, at::Device(at::kCPU));
  CHECK_DTYPE(rope_sin, at::kFloat);
  LLMCORE_CHECK(rope_cos.dim() == 2 && rope_sin.sizes() == rope_cos.sizes() &&
                    rope_cos.size(1) == D,
                "rope_cos and rope_sin must be float32 [positions, head_dim=", D,
                "] of one shape, got ", shape_str(rope_cos.sizes()), " and ",
                shape_str(rope_sin.sizes()));
  const at::Tensor seq = cache_seqlens.contiguous().clone();  // advanced step by step here
  int32_t* len = seq.data_ptr<int32_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, len[b]);
  LLMCORE_CHECK(longest + P - 1 + steps <= rope_cos.size(0), "rope_cos holds ", rope_cos.size(0),
                " positions; ", steps, " steps after ", longest, " cached tokens and ", P - 1,
                " more need ", longest + P - 1 + steps);
  if (embed_exponent.has_value()) {
    LLMCORE_CHECK(embed_weight.scalar_type() == at::kChar || embed_weight.scalar_type() == at::kByte,
                  "embed_weight of a BFP table (embed_exponent given) must hold its mantissas "
                  "(int8 or uint8), got ", embed_weight.scalar_type());
  } else {
    CHECK_DEVICE(embed_weight, at::Device(at::kCPU));
    LLMCORE_CHECK(embed_weight.dim() == 2 && embed_weight.size(1) == dim &&
                      embed_weight.scalar_type() == dtype,
                  "embed_weight must be [vocab, ", dim, "] of the model's dtype ", dtype,
                  ", got ", embed_weight.scalar_type(), " ", shape_str(embed_weight.sizes()));
  }

  const Ops& o = ops();
  const at::Tensor prefix = tokens.contiguous().view({B, P});
  at::Tensor cur = prefix.select(1, P - 1).clone();
  const at::Tensor fin = done.contiguous().clone();
  int64_t* cur_p = cur.data_ptr<int64_t>();
  bool* fin_p = fin.data_ptr<bool>();
  const at::Tensor out = at::empty({B, std::max<int64_t>(steps, 1)}, tokens.options());
  int64_t* out_p = out.data_ptr<int64_t>();
  const at::Tensor pos = at::empty({B * P}, tokens.options());
  int64_t* pos_p = pos.data_ptr<int64_t>();
  int64_t taken = 0;
  StepClock clk;  // the embedding, head and pick (decoder_layers times its own parts)
  while (taken < steps) {
    clk.restart();
    // The first step feeds the whole prefix (one pass over the weights for its P tokens,
    // logits of the last only), the others each row's pick.
    const int64_t T = taken == 0 ? P : 1;
    const at::Tensor ids = taken == 0 ? prefix : cur.view({B, 1});
    const at::Tensor x =
        embed_exponent.has_value()
            ? o.bfp_embedding.call(embed_weight, *embed_exponent, ids, embed_bits, embed_block,
                                   dim, dtype)
            : at::embedding(embed_weight, ids);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < T; ++j) pos_p[b * T + j] = len[b] + j;
    const at::Tensor idx = pos.narrow(0, 0, B * T);
    const at::Tensor cos = rope_cos.index_select(0, idx).view({B, T, D}).to(dtype);
    const at::Tensor sin = rope_sin.index_select(0, idx).view({B, T, D}).to(dtype);
    clk.lap(kPartEmbed);
    at::Tensor h = decoder_layers_cpu(x, cos, sin, weights, k_cache, v_cache, k_exponent,
                                      v_exponent, seq, block_table, softmax_scale);
    clk.restart();
    if (T > 1) {
      h = h.narrow(1, T - 1, 1).contiguous();
      for (int64_t b = 0; b < B; ++b) len[b] += T - 1;
    }
    at::Tensor logits;
    try {
      logits = apply(lm_head, h);
    } catch (c10::Error& err) {
      err.add_context("in greedy_decode, the head");
      throw;
    }
    clk.lap(kPartHead);
    const at::Tensor pick = o.argmax_last.call(logits).contiguous();
    const int64_t* pick_p = pick.data_ptr<int64_t>();
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = fin_p[b] ? fill : pick_p[b];
      out_p[b * out.stride(0) + taken] = t;
      cur_p[b] = t;
      fin_p[b] = fin_p[b] || std::find(eos.begin(), eos.end(), t) != eos.end();
      all_done = all_done && fin_p[b];
      ++len[b];
    }
    ++taken;
    clk.lap(kPartArgmax);
    if (all_done && !eos.empty()) break;
  }
  clk.flush(/*layer_calls=*/0, /*steps=*/taken);
  return out.narrow(1, 0, taken).contiguous();
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
  m.def("greedy_decode(Tensor tokens, int steps,"
        " __torch__.torch.classes.llmcore.DecoderWeights weights, Tensor embed_weight,"
        " Tensor? embed_exponent, int embed_bits, int embed_block, Tensor?[] head,"
        " int[] head_spec, Tensor rope_cos, Tensor rope_sin, Tensor(a!) k_cache,"
        " Tensor(b!) v_cache, Tensor(c!)? k_exponent, Tensor(d!)? v_exponent,"
        " Tensor cache_seqlens, Tensor? block_table, float softmax_scale, int[] eos, int fill,"
        " Tensor done) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("decoder_layers", &llmcore::decoder_layers_cpu);
  m.impl("greedy_decode", &llmcore::greedy_decode_cpu);
}
