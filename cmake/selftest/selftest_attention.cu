// llmcore_cuda_selftest, attention groups: the fused forward and backward (dense, varlen,
// GQA, causal; the query blocks with no key tile) against an fp64 host reference by the 2x
// rule, whose low-precision side is a host emulation of PyTorch's reference at 16 bits.
#include "attention/attention_cuda.cuh"
#include "selftest.h"

namespace selftest {

using llmcore::DType;
namespace at = llmcore::attention::cuda;

namespace {

float round_to(DType t, double x) {
  const float f = static_cast<float>(x);
  if (t == DType::kFloat16) return llmcore::f16_to_f32(llmcore::f32_to_f16(f));
  return llmcore::bf16_to_f32(llmcore::f32_to_bf16(f));
}
uint16_t bits_of(DType t, float f) {
  return t == DType::kFloat16 ? llmcore::f32_to_f16(f) : llmcore::f32_to_bf16(f);
}
float value_of(DType t, uint16_t h) {
  return t == DType::kFloat16 ? llmcore::f16_to_f32(h) : llmcore::bf16_to_f32(h);
}

// One (sequence, query head) of llmcore.reference.attention_fwd / its autograd: q [sq] rows,
// k/v [sk] rows (row strides qs, ks), g the output gradient (rows like q, may be null). With
// lowp, every op's result is rounded to `t` as PyTorch computes the reference at the inputs'
// precision (sums accumulate wider, as its matmuls do); without, plain fp64.
struct HeadResult {
  std::vector<double> o, lse, dq, dk, dv;  // o/dq [sq][d], lse [sq], dk/dv [sk][d]
};
void head_reference(const float* q, const float* k, const float* v, const float* g, int64_t qs,
                    int64_t ks, int sq, int sk, int d, bool causal, double scale, bool lowp, DType t,
                    HeadResult& r) {
  auto R = [&](double x) { return lowp ? double(round_to(t, x)) : x; };
  r.o.assign(size_t(sq) * d, 0.0);
  r.lse.assign(sq, -INFINITY);
  if (g != nullptr) {
    r.dq.assign(size_t(sq) * d, 0.0);
    r.dk.assign(size_t(sk) * d, 0.0);
    r.dv.assign(size_t(sk) * d, 0.0);
  }
  std::vector<double> s(sk), p(sk), dx(sk);
  for (int i = 0; i < sq; ++i) {
    const int last = causal ? std::min(sk - 1, i + sk - sq) : sk - 1;
    if (last < 0) continue;  // sees no key: out 0, lse -inf, zero gradients
    double mx = -INFINITY;
    for (int j = 0; j <= last; ++j) {
      double acc = 0;
      for (int c = 0; c < d; ++c) acc += double(q[i * qs + c]) * k[j * ks + c];
      s[j] = R(R(acc) * scale);
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j <= last; ++j) sum += std::exp(s[j] - mx);
    const double lse = R(mx + std::log(sum));
    r.lse[i] = lse;
    for (int j = 0; j <= last; ++j) p[j] = R(std::exp(R(s[j] - lse)));
    for (int c = 0; c < d; ++c) {
      double acc = 0;
      for (int j = 0; j <= last; ++j) acc += p[j] * v[j * ks + c];
      r.o[size_t(i) * d + c] = R(acc);
    }
    if (g == nullptr) continue;
    // Autograd of p = exp(s - lse), lse = logsumexp(s), s = (q k^T) * scale, out = p v.
    const float* gi = g + i * qs;
    double dlse = 0;
    for (int j = 0; j <= last; ++j) {
      double dp = 0;
      for (int c = 0; c < d; ++c) dp += double(gi[c]) * v[j * ks + c];
      dx[j] = R(R(dp) * p[j]);
      dlse -= dx[j];
    }
    dlse = R(dlse);
    for (int j = 0; j <= last; ++j) {
      const double ds = R(R(dx[j] + R(dlse * p[j])) * scale);
      for (int c = 0; c < d; ++c) {
        r.dq[size_t(i) * d + c] += ds * k[j * ks + c];
        r.dk[size_t(j) * d + c] += ds * q[i * qs + c];
        r.dv[size_t(j) * d + c] += p[j] * gi[c];
      }
    }
  }
  if (g != nullptr && lowp) {
    for (double& x : r.dq) x = R(x);
    for (double& x : r.dk) x = R(x);
    for (double& x : r.dv) x = R(x);
  }
}

struct AttnCase {
  std::string name;
  int h, hkv, d;
  std::vector<int> lq, lk;  // per sequence (dense: all equal)
  bool varlen, causal;
  DType dtype;
  int reps;        // repetitions of the rows-with-no-key check (0: none)
  bool verify;     // against the host reference (off for the large timed cases)
};

// The buffers and parameters of one case on the device.
struct AttnRun {
  const AttnCase& c;
  int nseq;
  std::vector<int> cq{0}, ck{0};
  int64_t tq, tk;
  std::vector<float> qf, kf, vf, gf;  // the inputs as floats (rounded to the dtype)
  DevBuf<uint16_t> q, k, v, g, out, dq, dk, dv;
  DevBuf<float> lse, dsum, dq_acc, dk_acc, dv_acc;
  DevBuf<int> dcq, dck;
  at::BwdParams p;

  static std::vector<float> rand_in(size_t n, DType t) {
    std::vector<float> f = randn(n);
    for (float& x : f) x = round_to(t, x);
    return f;
  }
  static std::vector<int> cumulative(const std::vector<int>& l) {
    std::vector<int> c{0};
    for (int x : l) c.push_back(c.back() + x);
    return c;
  }
  static std::vector<uint16_t> bits(const std::vector<float>& f, DType t) {
    std::vector<uint16_t> b(f.size());
    for (size_t i = 0; i < f.size(); ++i) b[i] = bits_of(t, f[i]);
    return b;
  }

  explicit AttnRun(const AttnCase& cs)
      : c(cs), nseq(int(cs.lq.size())), cq(cumulative(cs.lq)), ck(cumulative(cs.lk)),
        tq(cq.back()), tk(ck.back()),
        qf(rand_in(size_t(tq) * cs.h * cs.d, cs.dtype)), kf(rand_in(size_t(tk) * cs.hkv * cs.d, cs.dtype)),
        vf(rand_in(size_t(tk) * cs.hkv * cs.d, cs.dtype)), gf(rand_in(size_t(tq) * cs.h * cs.d, cs.dtype)),
        q(qf.size()), k(kf.size()), v(vf.size()), g(gf.size()), out(qf.size()), dq(qf.size()),
        dk(kf.size()), dv(vf.size()), lse(size_t(cs.h) * tq), dsum(size_t(cs.h) * tq),
        dq_acc(qf.size()), dk_acc(cs.h == cs.hkv ? 0 : size_t(tk) * cs.h * cs.d),
        dv_acc(cs.h == cs.hkv ? 0 : size_t(tk) * cs.h * cs.d), dcq(cq.size()), dck(ck.size()) {
    q.up(bits(qf, c.dtype));
    k.up(bits(kf, c.dtype));
    v.up(bits(vf, c.dtype));
    g.up(bits(gf, c.dtype));
    dcq.up(cq);
    dck.up(ck);
    const int d = c.d;
    p.dtype = c.dtype;
    p.head_dim = d;
    p.heads = c.h;
    p.kv_heads = c.hkv;
    p.batch = nseq;
    p.q = q.p;
    p.k = k.p;
    p.v = v.p;
    p.out = out.p;
    p.lse = lse.p;
    p.scale = static_cast<float>(1.0 / std::sqrt(double(d)));
    p.causal = c.causal;
    p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = int64_t(c.h) * d;
    p.k_row_stride = p.v_row_stride = p.dk_row_stride = p.dv_row_stride = int64_t(c.hkv) * d;
    p.q_head_stride = p.o_head_stride = p.k_head_stride = p.v_head_stride = d;
    p.do_head_stride = p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = d;
    if (c.varlen) {
      p.seqlen_q = *std::max_element(c.lq.begin(), c.lq.end());
      p.seqlen_k = *std::max_element(c.lk.begin(), c.lk.end());
      p.cu_seqlens_q = dcq.p;
      p.cu_seqlens_k = dck.p;
      p.total_q = tq;
      p.total_k = tk;
      p.lse_head_stride = tq;  // lse [H, Tq]
    } else {
      p.seqlen_q = c.lq[0];
      p.seqlen_k = c.lk[0];
      p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride =
          int64_t(c.lq[0]) * c.h * d;
      p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride =
          int64_t(c.lk[0]) * c.hkv * d;
      p.lse_batch_stride = int64_t(c.h) * c.lq[0];  // lse [B, H, Sq]
      p.lse_head_stride = c.lq[0];
      p.acc_q_batch_stride = int64_t(c.lq[0]) * c.h * d;
      p.acc_k_batch_stride = int64_t(c.lk[0]) * c.h * d;
    }
    p.dout = g.p;
    p.dq = dq.p;
    p.dk = dk.p;
    p.dv = dv.p;
    p.dsum = dsum.p;
    p.dq_accum = dq_acc.p;
    p.dk_accum = c.h == c.hkv ? nullptr : dk_acc.p;
    p.dv_accum = c.h == c.hkv ? nullptr : dv_acc.p;
  }

  int64_t lse_index(int b, int hh, int i) const {
    return c.varlen ? hh * tq + cq[b] + i : (int64_t(b) * c.h + hh) * c.lq[0] + i;
  }
  void fwd() { CU(at::attention_fwd(p, nullptr)); }
  void bwd() {
    if (!p.deterministic) CU(cudaMemsetAsync(dq_acc.p, 0, dq_acc.n * sizeof(float)));
    CU(at::attention_bwd(p, nullptr));
  }
};

std::string dtype_name(DType t) { return t == DType::kFloat16 ? "fp16" : "bf16"; }

// Rows that see no key: out (or dq) exactly 0 on each of `reps` runs, poisoned before each.
void check_dead_rows(AttnRun& r, const std::vector<uint8_t>& dead, bool backward, int reps,
                     const std::string& what) {
  reps = g_opt.reduced ? std::min(reps, 3) : reps;
  DevBuf<uint16_t>& buf = backward ? r.dq : r.out;
  const int d = r.c.d, h = r.c.h;
  int64_t bad = 0;
  for (int rep = 0; rep < reps; ++rep) {
    buf.poison();
    if (backward) r.bwd();
    else r.fwd();
    const auto o = buf.down();
    for (int64_t row = 0; row < r.tq; ++row)
      for (int hh = 0; hh < h; ++hh)
        if (dead[row * h + hh])
          for (int cc = 0; cc < d; ++cc) bad += (o[(row * h + hh) * d + cc] & 0x7fff) != 0;
  }
  check(what + " no-key rows x" + std::to_string(reps), bad == 0,
        std::to_string(bad) + " elements of rows that see no key not exactly 0");
}

// Forward (and with grads, backward) of one case against the host reference.
void verify_case(AttnRun& r, bool grads, const std::string& what) {
  const AttnCase& c = r.c;
  const int d = c.d, group = c.h / c.hkv;
  r.out.poison();
  r.fwd();
  if (grads) {
    r.dq.poison();
    r.dk.poison();
    r.dv.poison();
    r.bwd();
  }
  CU(cudaDeviceSynchronize());
  const auto out = r.out.down(), dq = r.dq.down(), dk = r.dk.down(), dv = r.dv.down();
  const auto lse = r.lse.down();
  Rule2x ro, rl, rdq, rdk, rdv;
  std::vector<uint8_t> dead(size_t(r.tq) * c.h, 0);
  HeadResult e, lp;
  std::vector<double> dk64(r.kf.size(), 0.0), dv64(r.kf.size(), 0.0), dklp(r.kf.size(), 0.0),
      dvlp(r.kf.size(), 0.0);
  for (int b = 0; b < r.nseq; ++b)
    for (int hh = 0; hh < c.h; ++hh) {
      const int hk = hh / group;
      const int64_t qo = (r.cq[b] * c.h + hh) * int64_t(d), ko = (r.ck[b] * c.hkv + hk) * int64_t(d);
      for (bool lowp : {false, true})
        head_reference(r.qf.data() + qo, r.kf.data() + ko, r.vf.data() + ko,
                       grads ? r.gf.data() + qo : nullptr, int64_t(c.h) * d, int64_t(c.hkv) * d,
                       c.lq[b], c.lk[b], d, c.causal, r.p.scale, lowp, c.dtype, lowp ? lp : e);
      for (int i = 0; i < c.lq[b]; ++i) {
        const int64_t row = r.cq[b] + i;
        dead[row * c.h + hh] = std::isinf(e.lse[i]);
        rl.add(lse[r.lse_index(b, hh, i)], e.lse[i], lp.lse[i]);
        for (int cc = 0; cc < d; ++cc) {
          const size_t at_ = (row * c.h + hh) * d + cc, ai = size_t(i) * d + cc;
          ro.add(value_of(c.dtype, out[at_]), e.o[ai], lp.o[ai]);
          if (grads) rdq.add(value_of(c.dtype, dq[at_]), e.dq[ai], lp.dq[ai]);
        }
      }
      if (grads)  // dk/dv of the kv head: the sum over its group (lowp: rounded per head)
        for (int j = 0; j < c.lk[b]; ++j)
          for (int cc = 0; cc < d; ++cc) {
            const size_t kv = ((r.ck[b] + j) * c.hkv + hk) * d + cc, ai = size_t(j) * d + cc;
            dk64[kv] += e.dk[ai];
            dv64[kv] += e.dv[ai];
            dklp[kv] = round_to(c.dtype, dklp[kv] + lp.dk[ai]);
            dvlp[kv] = round_to(c.dtype, dvlp[kv] + lp.dv[ai]);
          }
    }
  check_2x(what + " out", ro, false);
  check_2x(what + " lse", rl, true);
  if (grads) {
    for (size_t i = 0; i < dk64.size(); ++i) {
      rdk.add(value_of(c.dtype, dk[i]), dk64[i], dklp[i]);
      rdv.add(value_of(c.dtype, dv[i]), dv64[i], dvlp[i]);
    }
    check_2x(what + " dq", rdq, false);
    check_2x(what + " dk", rdk, false);
    check_2x(what + " dv", rdv, false);
  }
  if (c.reps > 0) check_dead_rows(r, dead, grads, c.reps, what);
}

double attention_flops(const AttnCase& c) {
  double f = 0;
  for (size_t b = 0; b < c.lq.size(); ++b) {
    // visible (query, key) pairs: all, or bottom-right causal
    double pairs = 0;
    for (int i = 0; i < c.lq[b]; ++i)
      pairs += c.causal ? std::clamp(i + c.lk[b] - c.lq[b] + 1, 0, c.lk[b]) : c.lk[b];
    f += 4.0 * pairs * c.d * c.h;
  }
  return f;
}

std::vector<AttnCase> verify_cases(bool grads) {
  const DType h16 = DType::kFloat16, b16 = DType::kBFloat16;
  std::vector<AttnCase> v = {
      {"gqa 8:2 causal d64 b2 s97", 8, 2, 64, {97, 97}, {97, 97}, false, true, h16, 0, true},
      {"gqa 4:1 causal d128 q7 k97 bf16", 4, 1, 128, {7}, {97}, false, true, b16, 0, true},
      {"mha 2:2 d128 q128 k97", 2, 2, 128, {128}, {97}, false, false, h16, 0, true},
      {"causal q1024 k64 d128", 8, 8, 128, {1024}, {64}, false, true, h16, 100, true},
      {"varlen q[128,4] k[0,8] d128 causal", 8, 8, 128, {128, 4}, {0, 8}, true, true, h16, 100, true},
      {"varlen q[128,4] k[0,8] d128", 8, 8, 128, {128, 4}, {0, 8}, true, false, h16, 100, true},
      {"varlen gqa 4:2 q[1,130,64] k[200,7,64] causal d64 bf16", 4, 2, 64, {1, 130, 64}, {200, 7, 64},
       true, true, b16, 0, true},
  };
  if (!grads) v.push_back({"d256 q33 k300 causal", 2, 1, 256, {33}, {300}, false, true, h16, 0, true});
  return v;
}

}  // namespace

void test_attention_fwd() {
  for (const AttnCase& c : verify_cases(false)) {
    AttnRun r(c);
    verify_case(r, false, "attention.fwd " + c.name + " " + dtype_name(c.dtype));
  }
  if (!g_opt.time) return;
  const int s = g_opt.reduced ? 256 : 4096;
  for (bool causal : {true, false}) {
    const AttnCase c{"dense b2 h16 s" + std::to_string(s) + " d128" + (causal ? " causal" : ""), 16, 16,
                     128, {s, s}, {s, s}, false, causal, DType::kFloat16, 0, false};
    AttnRun r(c);
    const double ms = time_ms([&](int) { r.fwd(); }, 3, g_opt.reduced ? 3 : 20);
    const double tflops = attention_flops(c) / (ms * 1e-3) / 1e12;
    timing("attention.fwd " + c.name + " fp16", ms, tflops, "TFLOP/s", tflops / peak("fp16"),
           fmt("%.0f TFLOP/s fp16 peak", peak("fp16")));
  }
}

void test_attention_bwd() {
  for (bool det : {false, true})
    for (const AttnCase& c : verify_cases(true)) {
      if (!det && c.reps > 0) continue;  // the race cases: the deterministic dQ kernel
      AttnRun r(c);
      r.p.deterministic = det;
      verify_case(r, true, "attention.bwd " + c.name + " " + dtype_name(c.dtype) +
                               (det ? " deterministic" : " atomic"));
    }
  if (!g_opt.time) return;
  const int s = g_opt.reduced ? 256 : 4096;
  for (bool det : {false, true}) {
    const AttnCase c{"dense b2 h16 s" + std::to_string(s) + " d128 causal", 16, 16, 128, {s, s}, {s, s},
                     false, true, DType::kFloat16, 0, false};
    AttnRun r(c);
    r.p.deterministic = det;
    r.fwd();
    const double ms = time_ms([&](int) { r.bwd(); }, 2, g_opt.reduced ? 3 : 10);
    const double tflops = 2.5 * attention_flops(c) / (ms * 1e-3) / 1e12;  // 5 GEMMs of the 2
    timing("attention.bwd " + c.name + (det ? " deterministic" : " atomic") + " fp16", ms, tflops,
           "TFLOP/s", tflops / peak("fp16"), fmt("%.0f TFLOP/s fp16 peak", peak("fp16")));
  }
}

}  // namespace selftest
