// llmcore_cuda_selftest, BFP groups: quantise (exact vs the CPU kernel), the small-M GEMV and
// the W8A8 GEMM (vs an fp64 host product of the exact operands, the GEMM bound).
#include "bfp/bfp_cpu.h"
#include "bfp/bfp_cuda.cuh"
#include "selftest.h"

namespace selftest {

using llmcore::DType;
namespace cpu = llmcore::bfp::cpu;
namespace gpu = llmcore::bfp::cuda;

namespace {

// Values whose blocks of 32 each have their own scale (2^-6 .. 2^6), so the shared
// exponents differ from block to block, as the Python tests' randn_blocks.
std::vector<float> randn_blocks(int64_t rows, int64_t k, float scale) {
  std::vector<float> x = randn(size_t(rows) * k, scale);
  for (int64_t i = 0; i < rows * k; ++i) x[i] *= std::ldexp(1.0f, static_cast<int>((i / 32 * 7) % 13) - 6);
  return x;
}

// The GEMM bound of the Python tests: |y - ref| <= 8 (K + 1) 2^-24 mag + u |ref| + tiny, for
// mag = sum |a b| and u, tiny the output dtype's unit roundoff and smallest subnormal.
struct GemmRule {
  int64_t bad = 0;
  double worst = 0;  // max err / bound
  void add(double y, double ref, double mag, int64_t k, DType out) {
    const double u = out == DType::kFloat32 ? std::ldexp(1.0, -24)
                     : out == DType::kFloat16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
    const double tiny = out == DType::kFloat32 ? std::ldexp(1.0, -149)
                        : out == DType::kFloat16 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -133);
    const double bound = 8.0 * (k + 1) * std::ldexp(1.0, -24) * mag + u * std::fabs(ref) + tiny;
    const double err = std::fabs(y - ref);
    bad += !(err <= bound);  // NaN counts as bad
    worst = std::max(worst, err / bound);
  }
  std::string detail() const {
    return fmt("%.0f elements over the GEMM bound; worst err/bound %.3f", double(bad), worst);
  }
};

double out_value(const std::vector<uint16_t>& h, const std::vector<float>& f, DType t, size_t i) {
  if (t == DType::kFloat32) return f[i];
  return t == DType::kFloat16 ? llmcore::f16_to_f32(h[i]) : llmcore::bf16_to_f32(h[i]);
}

const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "fp32" : t == DType::kFloat16 ? "fp16" : "bf16";
}

}  // namespace

// ---- quantise: bit-exact with the CPU kernel ---------------------------------------------------
void test_bfp_quantize() {
  struct Fmt {
    int bits, block;
  };
  const int64_t rows = g_opt.reduced ? 64 : 1024, k = 1000;  // k not a multiple of the block
  std::vector<float> x = randn_blocks(rows, k, 1.0f);
  for (int64_t i = 0; i < rows * k; i += 97) x[i] *= std::ldexp(1.0f, static_cast<int>(i % 60) - 30);
  DevBuf<float> dx(rows * k);
  dx.up(x);
  for (Fmt f : {Fmt{8, 32}, Fmt{8, 16}, Fmt{4, 16}}) {
    for (bool even : {false, true}) {
      const int64_t mc = cpu::mantissa_cols(k, f.bits), ec = cpu::exponent_cols(k, f.block);
      std::vector<uint8_t> hm(rows * mc), he(rows * ec);
      cpu::quantize_rows(x.data(), DType::kFloat32, k, k, f.bits, f.block, even, hm.data(), mc,
                         he.data(), ec, 0, rows);
      DevBuf<uint8_t> dm(rows * mc), de(rows * ec);
      CU(gpu::quantize(dx.p, DType::kFloat32, rows, k, k, f.bits, f.block, even, dm.p, mc, de.p, ec,
                       nullptr));
      CU(cudaDeviceSynchronize());
      const auto gm = dm.down(), ge = de.down();
      int64_t bad = 0;
      for (size_t i = 0; i < gm.size(); ++i) bad += gm[i] != hm[i];
      for (size_t i = 0; i < ge.size(); ++i) bad += ge[i] != he[i];
      check("bfp.quantize bits " + std::to_string(f.bits) + " block " + std::to_string(f.block) +
                (even ? " even" : " nearest"),
            bad == 0, std::to_string(bad) + " bytes differ from the CPU kernel");
    }
  }
}

// ---- GEMV (linear_small_m) ---------------------------------------------------------------------
void test_bfp_gemv() {
  const int bits = 8, block = 32;
  const int64_t n = g_opt.reduced ? 512 : 8192, k = g_opt.reduced ? 512 : 8192;
  const int64_t mc = k, ec = cpu::exponent_cols(k, block);
  std::vector<float> w = randn_blocks(n, k, 0.05f);
  std::vector<uint8_t> wm(n * mc), we(n * ec);
  cpu::quantize_rows(w.data(), DType::kFloat32, k, k, bits, block, false, wm.data(), mc, we.data(),
                     ec, 0, n);
  std::vector<float> wd(n * k);  // the exact dequantised weight
  cpu::dequantize_rows(wm.data(), mc, we.data(), ec, k, bits, block, wd.data(), DType::kFloat32, k,
                       0, n);
  // Weight copies rotated so that a timed call reads its weight from memory.
  const int copies = rotate_copies(size_t(n) * (mc + ec));
  std::vector<DevBuf<uint8_t>*> dwm, dwe;
  for (int c = 0; c < copies; ++c) {
    dwm.push_back(new DevBuf<uint8_t>(n * mc));
    dwe.push_back(new DevBuf<uint8_t>(n * ec));
    dwm.back()->up(wm);
    dwe.back()->up(we);
  }
  for (int m : {1, 5, 16}) {
    std::vector<float> x = randn(m * k);
    DevBuf<float> dx(m * k), dy(m * n);
    dx.up(x);
    dy.poison();
    CU(gpu::linear_small_m(dx.p, DType::kFloat32, m, k, k, dwm[0]->p, mc, dwe[0]->p, ec, n, bits,
                           block, nullptr, dy.p, n, nullptr));
    CU(cudaDeviceSynchronize());
    const auto y = dy.down();
    GemmRule rule;
    for (int i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double ref = 0, mag = 0;
        for (int64_t kk = 0; kk < k; ++kk) {
          const double t = double(x[i * k + kk]) * wd[j * k + kk];
          ref += t;
          mag += std::fabs(t);
        }
        rule.add(y[i * n + j], ref, mag, k, DType::kFloat32);
      }
    const std::string name = "bfp.gemv mxint8 fp32 m " + std::to_string(m) + " n " +
                             std::to_string(n) + " k " + std::to_string(k);
    check(name, rule.bad == 0, rule.detail());
    if (!g_opt.time) continue;
    const double ms = time_ms(
        [&](int i) {
          const int c = i % copies;
          CU(gpu::linear_small_m(dx.p, DType::kFloat32, m, k, k, dwm[c]->p, mc, dwe[c]->p, ec, n,
                                 bits, block, nullptr, dy.p, n, nullptr));
        },
        3, g_opt.reduced ? 3 : 50);
    const double bytes = double(n) * (mc + ec) + 4.0 * m * (k + n);
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    timing(name, ms, gbps, "GB/s", g_copy_gbps > 0 ? gbps / g_copy_gbps : -1, "the copy");
  }
  for (int c = 0; c < copies; ++c) {
    delete dwm[c];
    delete dwe[c];
  }
}

// ---- W8A8 GEMM (gemm_int8) ---------------------------------------------------------------------
namespace {

// Quantises x [rows, k] on the host into int8 mantissas with a row stride padded to 16 bytes
// (gemm_int8's contract) and exponents; returns the exact dequantised values too.
struct Operand {
  int64_t ld = 0, lde = 0;
  std::vector<uint8_t> mant, exp;
  std::vector<float> exact;
};
Operand make_operand(const std::vector<float>& x, int64_t rows, int64_t k, int bits, int block) {
  Operand o;
  o.ld = (k + 15) / 16 * 16;
  o.lde = cpu::exponent_cols(k, block);
  o.mant.assign(size_t(rows) * o.ld, 0x55);  // padding never read: any value
  o.exp.resize(size_t(rows) * o.lde);
  cpu::quantize_rows(x.data(), DType::kFloat32, k, k, bits, block, false, o.mant.data(), o.ld,
                     o.exp.data(), o.lde, 0, rows);
  o.exact.resize(size_t(rows) * k);
  cpu::dequantize_rows(o.mant.data(), o.ld, o.exp.data(), o.lde, k, bits, block, o.exact.data(),
                       DType::kFloat32, k, 0, rows);
  return o;
}

}  // namespace

void test_bfp_gemm() {
  struct Case {
    int64_t m, n, k;
    int a_bits, b_bits, block;
    DType out;
    bool bias;
  };
  const std::vector<Case> cases = {
      {97, 200, 1000, 8, 8, 32, DType::kFloat32, true},
      {256, 128, 4096, 8, 8, 32, DType::kFloat16, false},
      {33, 65, 96, 8, 6, 16, DType::kBFloat16, true},
      {1, 17, 32, 5, 8, 16, DType::kFloat32, false},
  };
  for (const Case& c : cases) {
    const Operand a = make_operand(randn_blocks(c.m, c.k, 1.0f), c.m, c.k, c.a_bits, c.block);
    const Operand b = make_operand(randn_blocks(c.n, c.k, 0.05f), c.n, c.k, c.b_bits, c.block);
    const std::vector<float> bias = randn(c.n);
    DevBuf<uint8_t> da(a.mant.size()), dae(a.exp.size()), db(b.mant.size()), dbe(b.exp.size());
    DevBuf<float> dbias(c.n);
    da.up(a.mant);
    dae.up(a.exp);
    db.up(b.mant);
    dbe.up(b.exp);
    dbias.up(bias);
    const size_t elems = size_t(c.m) * c.n;
    DevBuf<float> y32(c.out == DType::kFloat32 ? elems : 0);
    DevBuf<uint16_t> y16(c.out == DType::kFloat32 ? 0 : elems);
    void* y = c.out == DType::kFloat32 ? static_cast<void*>(y32.p) : static_cast<void*>(y16.p);
    y32.poison();
    y16.poison();
    CU(gpu::gemm_int8(reinterpret_cast<const int8_t*>(da.p), a.ld, dae.p, a.lde,
                      reinterpret_cast<const int8_t*>(db.p), b.ld, dbe.p, b.lde, c.m, c.n, c.k,
                      c.a_bits, c.b_bits, c.block, c.bias ? dbias.p : nullptr, y, c.out, c.n,
                      nullptr));
    CU(cudaDeviceSynchronize());
    const auto h32 = y32.down();
    const auto h16 = y16.down();
    GemmRule rule;
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        double ref = c.bias ? bias[j] : 0.0, mag = c.bias ? std::fabs(bias[j]) : 0.0;
        for (int64_t kk = 0; kk < c.k; ++kk) {
          const double t = double(a.exact[i * c.k + kk]) * b.exact[j * c.k + kk];
          ref += t;
          mag += std::fabs(t);
        }
        rule.add(out_value(h16, h32, c.out, size_t(i) * c.n + j), ref, mag, c.k, c.out);
      }
    check("bfp.gemm w8a8 m " + std::to_string(c.m) + " n " + std::to_string(c.n) + " k " +
              std::to_string(c.k) + " bits " + std::to_string(c.a_bits) + "x" +
              std::to_string(c.b_bits) + " block " + std::to_string(c.block) + " " +
              dtype_name(c.out) + (c.bias ? " bias" : ""),
          rule.bad == 0, rule.detail());
  }

  if (!g_opt.time) return;
  // Timed: M = N = K = 4096 (reduced 512), operands quantised on the device, fp16 out.
  const int64_t s = g_opt.reduced ? 512 : 4096;
  DevBuf<float> x(size_t(s) * s);
  x.up(randn(size_t(s) * s));
  DevBuf<uint8_t> am(size_t(s) * s), ae(size_t(s) * (s / 32)), bm(size_t(s) * s), be(size_t(s) * (s / 32));
  CU(gpu::quantize(x.p, DType::kFloat32, s, s, s, 8, 32, false, am.p, s, ae.p, s / 32, nullptr));
  CU(gpu::quantize(x.p, DType::kFloat32, s, s, s, 8, 32, true, bm.p, s, be.p, s / 32, nullptr));
  DevBuf<uint16_t> y(size_t(s) * s);
  const double ms = time_ms(
      [&](int) {
        CU(gpu::gemm_int8(reinterpret_cast<const int8_t*>(am.p), s, ae.p, s / 32,
                          reinterpret_cast<const int8_t*>(bm.p), s, be.p, s / 32, s, s, s, 8, 8, 32,
                          nullptr, y.p, DType::kFloat16, s, nullptr));
      },
      3, g_opt.reduced ? 3 : 20);
  const double tops = 2.0 * s * s * s / (ms * 1e-3) / 1e12;
  timing("bfp.gemm w8a8 " + std::to_string(s) + "^3 fp16 out", ms, tops, "TOP/s", tops / peak("int8"),
         fmt("%.0f TOP/s int8 peak", peak("int8")));
}

}  // namespace selftest
