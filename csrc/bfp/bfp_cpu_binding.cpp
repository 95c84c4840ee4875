// Torch binding of the CPU BFP kernels (bfp_cpu.h): checks, layout, threads. All the
// arithmetic is in the framework-free kernels; threads come from common/parallel.h
// (torch's threads, or llmcore's helpers under torch.inference_mode and for the decode
// GEMVs), torch.get_num_threads() of them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "bfp/bfp_cpu.h"
#include "common/check.h"
#include "common/parallel.h"

namespace llmcore {
namespace {

namespace cpu = bfp::cpu;

// Weight-only linear: above this many rows the product is compute-bound and at::mm on a
// dequantised fp32 weight wins over the streaming GEMV kernel.
constexpr int64_t kLinearGemvMaxRows = 16;
// Dequantised weight chunk for the large-M path (elements): bounds the scratch memory.
constexpr int64_t kLinearChunkElems = int64_t{1} << 24;
// Work per parallel task, in elements touched, so small calls stay on one thread.
constexpr int64_t kGrainElems = int64_t{1} << 15;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems));
}

// Columns per task for a GEMV of N weight rows row_bytes long (common/parallel.h:
// gemv_task_bytes): all of them when they fit one task, else a multiple of 16 (so the
// kernels' 4-row tiles stay whole).
int64_t gemv_chunk_cols(int64_t N, int64_t row_bytes) {
  const int64_t rb = std::max<int64_t>(1, row_bytes);
  const int64_t bytes = gemv_task_bytes(N * rb);
  if (N * rb <= bytes) return std::max<int64_t>(1, N);
  return std::max<int64_t>(16, bytes / rb / 16 * 16);
}

// Whether a prefill of tiled weights on a CPU without AMX takes the tile GEMV (default) or
// the GEMM (LLMCORE_CPU_PREFILL=gemm: A/B runs).
bool prefill_by_gemv() {
  static const bool gemv = [] {
    const char* v = std::getenv("LLMCORE_CPU_PREFILL");
    return !(v && std::string(v) == "gemm");
  }();
  return gemv;
}

// Per-thread scratch of the decode GEMV, kept between calls: the quantised activation rows
// and their GEMV layout (O(M K) bytes for M <= 16 rows), and the fp32 product for a 16-bit
// output, so that a call allocates nothing but its output.
struct GemvScratch {
  std::vector<int8_t> a_mant, xq;
  std::vector<uint8_t> a_exp;
  std::vector<int32_t> corr;
  std::vector<float> xs, y32;
};

GemvScratch& gemv_scratch() {
  thread_local GemvScratch s;
  return s;
}

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Lay out M activation rows (mantissas of a_bits, in blocks of 32) for gemv_q8 into s.
cpu::GemvQ8Plan prepare_gemv_q8(GemvScratch& s, int64_t M, int64_t K, int a_bits, int w_bits,
                                const int8_t* a_mant, int64_t a_stride, const uint8_t* a_exp,
                                int64_t a_exp_stride, bool tiles = false) {
  const cpu::GemvQ8Plan g =
      tiles ? cpu::gemv_q8_plan_tiles(M, K, w_bits) : cpu::gemv_q8_plan(M, K, w_bits);
  cpu::gemv_q8_prepare(g, a_mant, a_stride, a_exp, a_exp_stride, a_bits,
                       grow(s.xq, M * g.xq_cols), grow(s.corr, M * g.groups),
                       grow(s.xs, M * g.groups));
  return g;
}

// y [M, N] fp32 (row stride N) = the prepared rows of s times the weight (w_mantissa
// [N, *], w_exponent [N, *], checked by the caller) (+ bias), over the threads in chunks.
void run_gemv_q8(const cpu::GemvQ8Plan& g, const GemvScratch& s, const at::Tensor& w_mantissa,
                 const at::Tensor& w_exponent, const float* bias, float* y, int64_t N) {
  const at::Tensor bm = w_mantissa.contiguous(), be = w_exponent.contiguous();
  const auto* bmp = static_cast<const uint8_t*>(bm.data_ptr());
  const auto* bep = be.data_ptr<uint8_t>();
  const int64_t b_cols = bm.size(1), be_cols = be.size(1);
  const int64_t chunk = gemv_chunk_cols(N, b_cols + be_cols);
  const int8_t* xq = s.xq.data();
  const int32_t* corr = s.corr.data();
  const float* xs = s.xs.data();
  parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    cpu::gemv_q8(g, xq, corr, xs, bmp, b_cols, bep, be_cols, bias, y, N, n0, n1);
  });
}

void check_format(int64_t bits, int64_t block, const char* bits_name) {
  LLMCORE_CHECK(bits >= 2 && bits <= 8, bits_name, " must be in [2, 8], got ", bits);
  LLMCORE_CHECK(block >= 1 && block <= 1024, "block_size must be in [1, 1024], got ", block);
}

// mantissa [..., mantissa_cols(k)] of the storage dtype for `bits`, exponent
// [..., ceil(k / block)] uint8 with the same leading dims.
// A BFP operand's devices (CPU) and dtypes (int8 / uint8 nibbles, uint8 exponents).
void check_bfp_dtypes(const at::Tensor& m, const at::Tensor& e, int64_t bits, const char* m_name,
                      const char* e_name) {
  LLMCORE_CHECK(m.device().is_cpu(), m_name, " must be on cpu, got ", m.device());
  LLMCORE_CHECK(e.device().is_cpu(), e_name, " must be on cpu, got ", e.device());
  const at::ScalarType want = bits <= 4 ? at::kByte : at::kChar;
  LLMCORE_CHECK(m.scalar_type() == want, m_name, " must have dtype ",
                bits <= 4 ? "uint8 (two 4-bit mantissas per byte)" : "int8", " for ", bits,
                "-bit mantissas, got ", m.scalar_type());
  LLMCORE_CHECK(e.scalar_type() == at::kByte, e_name, " must have dtype uint8, got ",
                e.scalar_type());
}

void check_bfp_operand(const at::Tensor& m, const at::Tensor& e, int64_t bits, int64_t block,
                       int64_t k, const char* m_name, const char* e_name) {
  check_bfp_dtypes(m, e, bits, m_name, e_name);
  LLMCORE_CHECK(m.dim() >= 1 && e.dim() == m.dim(), m_name, " and ", e_name,
                " must have the same number of dims (>= 1), got shapes ", shape_str(m.sizes()),
                " and ", shape_str(e.sizes()));
  const int64_t mc = cpu::mantissa_cols(k, static_cast<int>(bits));
  const int64_t ec = cpu::exponent_cols(k, static_cast<int>(block));
  LLMCORE_CHECK(m.size(-1) == mc, m_name, ".size(-1) must be ", mc, " for k=", k, " and ", bits,
                "-bit mantissas, got shape ", shape_str(m.sizes()));
  LLMCORE_CHECK(e.size(-1) == ec, e_name, ".size(-1) must be ceil(k / block_size) = ", ec,
                ", got shape ", shape_str(e.sizes()));
  LLMCORE_CHECK(m.sizes().slice(0, m.dim() - 1) == e.sizes().slice(0, e.dim() - 1), m_name,
                " and ", e_name, " must have the same leading dims, got shapes ",
                shape_str(m.sizes()), " and ", shape_str(e.sizes()));
}

// ---- weights in the GEMV tile layout (bfp_cpu.h): mantissa [N/16, nb, 16 bb], exponent
// [N/16, nb, 16] ----------------------------------------------------------------------------
bool is_tiled(const at::Tensor& m) { return m.dim() == 3; }

// Checks a tiled weight for k inputs; returns N.
int64_t check_tiles(const at::Tensor& m, const at::Tensor& e, int64_t bits, int64_t block,
                    int64_t k, const char* m_name, const char* e_name) {
  check_bfp_dtypes(m, e, bits, m_name, e_name);
  LLMCORE_CHECK(block == 32 && k % 32 == 0, "the tile layout needs block_size 32 and K a "
                "multiple of 32, got block_size ", block, " and K ", k);
  const int64_t nb = k / 32, bb = cpu::tile_block_bytes(static_cast<int>(bits));
  LLMCORE_CHECK(m.size(1) == nb && m.size(2) == 16 * bb, m_name, " in the tile layout must be [N/16, ",
                nb, ", ", 16 * bb, "] for K=", k, " and ", bits, "-bit mantissas, got shape ",
                shape_str(m.sizes()));
  LLMCORE_CHECK(e.dim() == 3 && e.size(0) == m.size(0) && e.size(1) == nb && e.size(2) == 16,
                e_name, " in the tile layout must be [", m.size(0), ", ", nb, ", 16], got shape ",
                shape_str(e.sizes()));
  return 16 * m.size(0);
}

// tiles_pack (Pack) or tiles_unpack of a whole weight of K = k inputs, its tiles spread over
// the threads, from (src_m, src_e) into new tensors of shapes m_shape and e_shape.
template <bool Pack>
std::tuple<at::Tensor, at::Tensor> convert_tiles(const at::Tensor& src_m, const at::Tensor& src_e,
                                                 at::IntArrayRef m_shape, at::IntArrayRef e_shape,
                                                 int64_t k, int bits) {
  at::Tensor m = at::empty(m_shape, src_m.options()), e = at::empty(e_shape, src_e.options());
  const at::Tensor sm = src_m.contiguous(), se = src_e.contiguous();
  const auto* smp = static_cast<const uint8_t*>(sm.data_ptr());
  const auto* sep = se.data_ptr<uint8_t>();
  auto* mp = static_cast<uint8_t*>(m.data_ptr());
  auto* ep = e.data_ptr<uint8_t>();
  const int64_t tiles = Pack ? src_m.size(0) / 16 : src_m.size(0);
  const int64_t mc = cpu::mantissa_cols(k, bits), nb = k / 32;
  parallel_items(tiles, grain_rows(16 * mc), [&](int64_t t0, int64_t t1) {
    if (Pack) cpu::tiles_pack(smp, mc, sep, nb, k, bits, mp, ep, t0, t1);
    else cpu::tiles_unpack(smp, sep, k, bits, mp, mc, ep, nb, t0, t1);
  });
  return {m, e};
}

// The plain layout of a tiled weight (a new tensor pair).
std::tuple<at::Tensor, at::Tensor> untile(const at::Tensor& tm, const at::Tensor& te,
                                          int64_t bits, int64_t k) {
  const int b = static_cast<int>(bits);
  const int64_t N = 16 * tm.size(0);
  return convert_tiles<false>(tm, te, {N, cpu::mantissa_cols(k, b)}, {N, k / 32}, k, b);
}

std::tuple<at::Tensor, at::Tensor> bfp_tiles_pack_cpu(const at::Tensor& mantissa,
                                                      const at::Tensor& exponent,
                                                      int64_t mantissa_bits, int64_t block_size) {
  check_format(mantissa_bits, block_size, "mantissa_bits");
  CHECK_DIM(mantissa, 2);
  const int b = static_cast<int>(mantissa_bits);
  const int64_t N = mantissa.size(0), k = b <= 4 ? 2 * mantissa.size(1) : mantissa.size(1);
  check_bfp_operand(mantissa, exponent, mantissa_bits, block_size, k, "mantissa", "exponent");
  LLMCORE_CHECK(cpu::tiles_supported(N, k, b, static_cast<int>(block_size)),
                "bfp_tiles_pack needs block_size 32, K a multiple of 32 and N (rows) a multiple "
                "of 16, got block_size ", block_size, ", K ", k, " and N ", N);
  const int64_t nb = k / 32;
  return convert_tiles<true>(mantissa, exponent, {N / 16, nb, 16 * cpu::tile_block_bytes(b)},
                             {N / 16, nb, 16}, k, b);
}

std::tuple<at::Tensor, at::Tensor> bfp_tiles_unpack_cpu(const at::Tensor& tiles,
                                                        const at::Tensor& tile_exponent,
                                                        int64_t mantissa_bits, int64_t block_size) {
  check_format(mantissa_bits, block_size, "mantissa_bits");
  CHECK_DIM(tiles, 3);
  const int64_t k = 32 * tiles.size(1);
  check_tiles(tiles, tile_exponent, mantissa_bits, block_size, k, "tiles", "tile_exponent");
  return untile(tiles, tile_exponent, mantissa_bits, k);
}

std::tuple<at::Tensor, at::Tensor> bfp_quantize_cpu(const at::Tensor& x, int64_t mantissa_bits,
                                                    int64_t block_size, bool round_even) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  check_format(mantissa_bits, block_size, "mantissa_bits");
  LLMCORE_CHECK(x.dim() >= 1 && x.size(-1) >= 1,
                "x must have a non-empty last axis to quantise, got shape ", shape_str(x.sizes()));
  const int bits = static_cast<int>(mantissa_bits), block = static_cast<int>(block_size);
  const int64_t k = x.size(-1);
  std::vector<int64_t> mshape(x.sizes().begin(), x.sizes().end());
  std::vector<int64_t> eshape = mshape;
  mshape.back() = cpu::mantissa_cols(k, bits);
  eshape.back() = cpu::exponent_cols(k, block);
  at::Tensor mant = at::empty(mshape, x.options().dtype(bits <= 4 ? at::kByte : at::kChar));
  at::Tensor exp = at::empty(eshape, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {mant, exp};
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / k;
  const DType xt = to_dtype(x.scalar_type());
  const void* xp = xc.data_ptr();
  auto* mp = static_cast<uint8_t*>(mant.data_ptr());
  auto* ep = exp.data_ptr<uint8_t>();
  const int64_t mcols = mshape.back(), ecols = eshape.back();
  parallel_items(rows, grain_rows(k), [&](int64_t r0, int64_t r1) {
    cpu::quantize_rows(xp, xt, k, k, bits, block, round_even, mp, mcols, ep, ecols, r0, r1);
  });
  return {mant, exp};
}

at::Tensor bfp_dequantize_cpu(const at::Tensor& mantissa, const at::Tensor& exponent,
                              int64_t mantissa_bits, int64_t block_size, int64_t k,
                              at::ScalarType dtype) {
  check_format(mantissa_bits, block_size, "mantissa_bits");
  LLMCORE_CHECK(k >= 0, "k must be >= 0, got ", k);
  LLMCORE_CHECK(is_float_dtype(dtype), "dtype must be float32, bfloat16 or float16, got ", dtype);
  check_bfp_operand(mantissa, exponent, mantissa_bits, block_size, k, "mantissa", "exponent");
  std::vector<int64_t> oshape(mantissa.sizes().begin(), mantissa.sizes().end());
  oshape.back() = k;
  at::Tensor out = at::empty(oshape, mantissa.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor mc = mantissa.contiguous(), ec = exponent.contiguous();
  const int64_t rows = out.numel() / k;
  const int bits = static_cast<int>(mantissa_bits), block = static_cast<int>(block_size);
  const auto* mp = static_cast<const uint8_t*>(mc.data_ptr());
  const auto* ep = ec.data_ptr<uint8_t>();
  void* op = out.data_ptr();
  const DType ot = to_dtype(dtype);
  const int64_t mcols = mc.size(-1), ecols = ec.size(-1);
  parallel_items(rows, grain_rows(k), [&](int64_t r0, int64_t r1) {
    cpu::dequantize_rows(mp, mcols, ep, ecols, k, bits, block, op, ot, k, r0, r1);
  });
  return out;
}

// Rows ids of a BFP table (plain [N, cols] / [N, k/32], or tiled [N/16, k/32, 16 bb] /
// [N/16, k/32, 16]), dequantised: [*ids.shape, k] of dtype. A decode step looks up a handful
// of ids: no OpenMP region (its spinning workers would take the next GEMV's helper core).
at::Tensor bfp_embedding_cpu(const at::Tensor& mantissa, const at::Tensor& exponent,
                             const at::Tensor& ids, int64_t mantissa_bits, int64_t block_size,
                             int64_t k, at::ScalarType dtype) {
  check_format(mantissa_bits, block_size, "mantissa_bits");
  LLMCORE_CHECK(k >= 1, "k must be >= 1, got ", k);
  LLMCORE_CHECK(is_float_dtype(dtype), "dtype must be float32, bfloat16 or float16, got ", dtype);
  LLMCORE_CHECK(ids.device().is_cpu(), "ids must be on cpu, got ", ids.device());
  LLMCORE_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                "ids must have dtype int64 or int32, got ", ids.scalar_type());
  const bool tiled = is_tiled(mantissa);
  int64_t rows;
  if (tiled) {
    rows = check_tiles(mantissa, exponent, mantissa_bits, block_size, k, "mantissa", "exponent");
  } else {
    CHECK_DIM(mantissa, 2);
    check_bfp_operand(mantissa, exponent, mantissa_bits, block_size, k, "mantissa", "exponent");
    rows = mantissa.size(0);
  }
  std::vector<int64_t> oshape(ids.sizes().begin(), ids.sizes().end());
  oshape.push_back(k);
  at::Tensor out = at::empty(oshape, mantissa.options().dtype(dtype));
  const int64_t n = ids.numel();
  if (n == 0) return out;
  const at::Tensor idc = ids.to(at::kLong).contiguous();
  const int64_t* idp = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idp[i] >= 0 && idp[i] < rows, "ids must lie in [0, ", rows,
                      ") (the table's rows), got ", idp[i]);
  const at::Tensor mc = mantissa.contiguous(), ec = exponent.contiguous();
  const int bits = static_cast<int>(mantissa_bits), block = static_cast<int>(block_size);
  const auto* mp = static_cast<const uint8_t*>(mc.data_ptr());
  const auto* ep = ec.data_ptr<uint8_t>();
  const int64_t mcols = cpu::mantissa_cols(k, bits), ecols = cpu::exponent_cols(k, block);
  const int64_t osize = out.element_size() * k;
  auto* op = static_cast<char*>(out.data_ptr());
  const DType ot = to_dtype(dtype);
  parallel_chunks(n, grain_rows(k), [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> row(tiled ? static_cast<size_t>(mcols + ecols) : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* m = mp + idp[i] * mcols;
      const uint8_t* e = ep + idp[i] * ecols;
      if (tiled) {
        cpu::tiles_row(mp, ep, k, bits, idp[i], row.data(), row.data() + mcols);
        m = row.data();
        e = row.data() + mcols;
      }
      cpu::dequantize_rows(m, mcols, e, ecols, k, bits, block, op + i * osize, ot, k, 0, 1);
    }
  });
  return out;
}

at::Tensor bfp_linear_cpu(const at::Tensor& x, const at::Tensor& w_mantissa,
                          const at::Tensor& w_exponent, int64_t mantissa_bits, int64_t block_size,
                          const std::optional<at::Tensor>& bias) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  CHECK_DIM(x, 2);
  check_format(mantissa_bits, block_size, "mantissa_bits");
  const int64_t M = x.size(0), K = x.size(1);
  CHECK_DIM(w_mantissa, 2);
  check_bfp_operand(w_mantissa, w_exponent, mantissa_bits, block_size, K, "w_mantissa",
                    "w_exponent");
  const int64_t N = w_mantissa.size(0);
  at::Tensor b32;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    CHECK_DEVICE(b, at::Device(at::kCPU));
    LLMCORE_CHECK(is_float_dtype(b.scalar_type()),
                  "bias must be float32, bfloat16 or float16, got ", b.scalar_type());
    LLMCORE_CHECK(b.dim() == 1 && b.size(0) == N, "bias must have shape [", N,
                  "] (w_mantissa.size(0)), got ", shape_str(b.sizes()));
    b32 = b.to(at::kFloat).contiguous();
  }
  at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y32.to(x.scalar_type());
  const at::Tensor wm = w_mantissa.contiguous(), we = w_exponent.contiguous();
  const int bits = static_cast<int>(mantissa_bits), block = static_cast<int>(block_size);
  const auto* wmp = static_cast<const uint8_t*>(wm.data_ptr());
  const auto* wep = we.data_ptr<uint8_t>();
  const int64_t wcols = wm.size(1), ecols = we.size(1);

  if (M <= kLinearGemvMaxRows) {
    // x in its own dtype: the kernel widens it, or multiplies bf16 x in bf16 (exactly).
    const at::Tensor xc = x.contiguous();
    const void* xp = xc.data_ptr();
    const DType xt = to_dtype(x.scalar_type());
    const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
    float* yp = y32.data_ptr<float>();
    const int64_t chunk = gemv_chunk_cols(N, wcols + ecols);
    parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
      cpu::linear_rows_typed(xp, xt, M, K, K, wmp, wcols, wep, ecols, bits, block, bp, yp, N, n0,
                             n1);
    });
  } else {
    const at::Tensor x32 = x.to(at::kFloat).contiguous();
    // Compute-bound: dequantise W by chunks of rows to fp32 and let at::mm do the product.
    const int64_t chunk = std::min<int64_t>(N, std::max<int64_t>(64, kLinearChunkElems / std::max<int64_t>(K, 1)));
    at::Tensor wbuf = at::empty({chunk, K}, x.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t rows = std::min(chunk, N - n0);
      float* wp = wbuf.data_ptr<float>();
      at::parallel_for(0, rows, grain_rows(K), [&](int64_t r0, int64_t r1) {
        cpu::dequantize_rows(wmp + n0 * wcols, wcols, wep + n0 * ecols, ecols, K, bits, block, wp,
                             DType::kFloat32, K, r0, r1);
      });
      const at::Tensor w = wbuf.narrow(0, 0, rows);
      if (rows == N) {
        y32 = b32.defined() ? at::addmm(b32, x32, w.t()) : at::mm(x32, w.t());
      } else {
        at::Tensor yc = y32.narrow(1, n0, rows);
        if (b32.defined()) yc.copy_(at::addmm(b32.narrow(0, n0, rows), x32, w.t()));
        else yc.copy_(at::mm(x32, w.t()));
      }
    }
  }
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

// Prefill on AMX (bfp_cpu_gemm_amx.cpp): the activation is laid out as tiles once, the
// weight read as stored; columns go to the threads in chunks of 16-row weight panels.
void gemm_amx_cpu(const at::Tensor& a_mantissa, const at::Tensor& a_exponent,
                  const at::Tensor& b_mantissa, const at::Tensor& b_exponent, int64_t a_bits,
                  int64_t b_bits, int64_t k, const float* biasp, float* cp) {
  const int64_t M = a_mantissa.size(0), N = b_mantissa.size(0);
  const cpu::GemmAmxPlan g = cpu::gemm_amx_plan(M, N, k, static_cast<int>(b_bits));
  const at::Tensor am = a_mantissa.contiguous(), ae = a_exponent.contiguous();
  const at::Tensor bm = b_mantissa.contiguous(), be = b_exponent.contiguous();
  const auto opts = a_mantissa.options();
  at::Tensor tiles = at::empty({static_cast<int64_t>(cpu::gemm_amx_a_bytes(g))}, opts.dtype(at::kChar));
  at::Tensor scales = at::empty({g.m_tiles * g.nb * 16}, opts.dtype(at::kFloat));
  int8_t* tp = tiles.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  parallel_items(g.m_tiles, grain_rows(16 * k), [&](int64_t t0, int64_t t1) {
    cpu::gemm_amx_prepare(g, am.data_ptr<int8_t>(), am.size(1), ae.data_ptr<uint8_t>(),
                          ae.size(1), static_cast<int>(a_bits), tp, sp, t0, t1);
  });
  const auto* bmp = static_cast<const uint8_t*>(bm.data_ptr());
  const auto* bep = be.data_ptr<uint8_t>();
  const int64_t b_cols = bm.size(1), be_cols = be.size(1);
  // About 2 MFLOP per task: enough tasks for the dynamic split, few enough to be cheap.
  const int64_t panel_flops = 2 * 16 * g.m_tiles * 16 * std::max<int64_t>(k, 1);
  const int64_t chunk = 16 * std::max<int64_t>(1, (int64_t{2} << 20) / panel_flops);
  parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    cpu::gemm_amx(g, tp, sp, bmp, b_cols, bep, be_cols, biasp, cp, N, n0, n1);
  });
}

at::Tensor bfp_gemm_cpu(const at::Tensor& a_mantissa, const at::Tensor& a_exponent,
                        const at::Tensor& b_mantissa, const at::Tensor& b_exponent, int64_t a_bits,
                        int64_t b_bits, int64_t block_size, int64_t k,
                        const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_format(a_bits, block_size, "a_bits");
  check_format(b_bits, block_size, "b_bits");
  LLMCORE_CHECK(k >= 0, "k must be >= 0, got ", k);
  LLMCORE_CHECK(is_float_dtype(out_dtype), "out_dtype must be float32, bfloat16 or float16, got ",
                out_dtype);
  CHECK_DIM(a_mantissa, 2);
  CHECK_DIM(b_mantissa, 2);
  check_bfp_operand(a_mantissa, a_exponent, a_bits, block_size, k, "a_mantissa", "a_exponent");
  check_bfp_operand(b_mantissa, b_exponent, b_bits, block_size, k, "b_mantissa", "b_exponent");
  const int64_t M = a_mantissa.size(0), N = b_mantissa.size(0);
  at::Tensor b32;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    CHECK_DEVICE(b, at::Device(at::kCPU));
    LLMCORE_CHECK(is_float_dtype(b.scalar_type()),
                  "bias must be float32, bfloat16 or float16, got ", b.scalar_type());
    LLMCORE_CHECK(b.dim() == 1 && b.size(0) == N, "bias must have shape [", N,
                  "] (b_mantissa.size(0)), got ", shape_str(b.sizes()));
    b32 = b.to(at::kFloat).contiguous();
  }
  const auto opts = a_mantissa.options();
  at::Tensor c = at::empty({M, N}, opts.dtype(at::kFloat));
  if (M == 0 || N == 0) return c.to(out_dtype);

  const float* biasp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* cp = c.data_ptr<float>();
  if (M <= kLinearGemvMaxRows && cpu::gemv_q8_supported(static_cast<int>(a_bits),
                                                        static_cast<int>(b_bits),
                                                        static_cast<int>(block_size))) {
    // Decode: the weight streams once in its own layout; only A is laid out (O(M K)).
    const at::Tensor am = a_mantissa.contiguous(), ae = a_exponent.contiguous();
    GemvScratch& s = gemv_scratch();
    const cpu::GemvQ8Plan g = prepare_gemv_q8(s, M, k, static_cast<int>(a_bits),
                                              static_cast<int>(b_bits), am.data_ptr<int8_t>(),
                                              am.size(1), ae.data_ptr<uint8_t>(), ae.size(1));
    run_gemv_q8(g, s, b_mantissa, b_exponent, biasp, cp, N);
    return out_dtype == at::kFloat ? c : c.to(out_dtype);
  }
  if (cpu::gemm_amx_supported(static_cast<int>(a_bits), static_cast<int>(b_bits),
                              static_cast<int>(block_size))) {
    gemm_amx_cpu(a_mantissa, a_exponent, b_mantissa, b_exponent, a_bits, b_bits, k, biasp, cp);
    return out_dtype == at::kFloat ? c : c.to(out_dtype);
  }

  const cpu::GemmPlan p = cpu::gemm_plan(M, N, k, static_cast<int>(a_bits),
                                         static_cast<int>(b_bits), static_cast<int>(block_size));
  const at::Tensor am = a_mantissa.contiguous(), ae = a_exponent.contiguous();
  const at::Tensor bm = b_mantissa.contiguous(), be = b_exponent.contiguous();
  const int64_t nb = p.nb, panels = p.n_pad / 16;
  at::Tensor a_pack = at::empty({static_cast<int64_t>(cpu::gemm_a_bytes(p))}, opts.dtype(at::kByte));
  at::Tensor a_scale = at::empty({M, nb}, opts.dtype(at::kFloat));
  at::Tensor b_pack = at::empty({static_cast<int64_t>(cpu::gemm_b_bytes(p))}, opts.dtype(at::kChar));
  at::Tensor b_scale = at::empty({panels * nb * 16}, opts.dtype(at::kFloat));
  at::Tensor b_corr = at::empty({panels * nb * 16}, opts.dtype(at::kInt));
  const auto* amp = static_cast<const uint8_t*>(am.data_ptr());
  const auto* bmp = static_cast<const uint8_t*>(bm.data_ptr());
  const int64_t a_cols = am.size(1), b_cols = bm.size(1);
  auto* app = a_pack.data_ptr<uint8_t>();
  auto* asp = a_scale.data_ptr<float>();
  auto* bpp = b_pack.data_ptr<int8_t>();
  auto* bsp = b_scale.data_ptr<float>();
  auto* bcp = b_corr.data_ptr<int32_t>();
  parallel_items(M, grain_rows(p.kp), [&](int64_t m0, int64_t m1) {
    cpu::gemm_pack_a(p, amp, a_cols, ae.data_ptr<uint8_t>(), nb, app, asp, m0, m1);
  });
  parallel_items(panels, grain_rows(16 * p.kp), [&](int64_t p0, int64_t p1) {
    cpu::gemm_pack_b(p, bmp, b_cols, be.data_ptr<uint8_t>(), nb, bpp, bsp, bcp, p0, p1);
  });

  // Tiles of kTileRows x (kTilePanels * 16); consecutive tiles share a B panel group, so
  // it stays in L2 while A streams.
  constexpr int64_t kTileRows = 64, kTilePanels = 4;
  const int64_t mtiles = (M + kTileRows - 1) / kTileRows;
  const int64_t ntiles = (panels + kTilePanels - 1) / kTilePanels;
  const int64_t tile_work = kTileRows * kTilePanels * 16 * std::max<int64_t>(p.kp, 1);
  parallel_items(mtiles * ntiles, std::max<int64_t>(1, (kGrainElems * 32) / tile_work),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mt = t % mtiles, nt = t / mtiles;
      const int64_t m0 = mt * kTileRows, m1 = std::min(M, m0 + kTileRows);
      const int64_t p0 = nt * kTilePanels, p1 = std::min(panels, p0 + kTilePanels);
      cpu::gemm_compute(p, app, asp, bpp, bsp, bcp, biasp, cp, N, m0, m1, p0, p1);
    }
  });
  return out_dtype == at::kFloat ? c : c.to(out_dtype);
}

// fp32 [n] -> n elements of `dtype` at dst (round to nearest even, as Tensor.to()).
void convert_from_f32(const float* src, void* dst, at::ScalarType dtype, int64_t n) {
  if (dtype == at::kBFloat16) {
    auto* d = static_cast<c10::BFloat16*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(src[i]);
  } else {
    auto* d = static_cast<c10::Half*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i]);
  }
}

// Q(x) @ w_i^T (+ bias_i) for each weight i, x [..., K] quantised once along K to a_bits
// mantissas in blocks of block_size (bfp_quantize), each product as bfp_gemm computes it.
// Up to 16 rows with an int8-activation GEMV format go through per-thread scratch: the
// call allocates its outputs only. More rows: bfp_quantize, then bfp_gemm per weight.
std::vector<at::Tensor> bfp_act_linear_multi_cpu(
    const at::Tensor& x, at::TensorList w_mantissa, at::TensorList w_exponent, int64_t a_bits,
    int64_t w_bits, int64_t block_size, bool round_even,
    const c10::List<std::optional<at::Tensor>>& bias) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  check_format(a_bits, block_size, "a_bits");
  check_format(w_bits, block_size, "w_bits");
  LLMCORE_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "x must have a non-empty last axis (K), got shape ",
                shape_str(x.sizes()));
  const size_t n_w = w_mantissa.size();
  LLMCORE_CHECK(n_w >= 1 && w_exponent.size() == n_w && bias.size() == n_w,
                "w_mantissa, w_exponent and bias must be lists of one length >= 1, got ", n_w,
                ", ", w_exponent.size(), " and ", bias.size());
  const int64_t K = x.size(-1), M = x.numel() / K;
  std::vector<at::Tensor> b32(n_w);
  // Weights in the GEMV tile layout (3-D) or the plain one (2-D), one layout per call.
  const bool tiled = is_tiled(w_mantissa[0]);
  std::vector<int64_t> rows_of(n_w);
  for (size_t i = 0; i < n_w; ++i) {
    LLMCORE_CHECK(is_tiled(w_mantissa[i]) == tiled, "w_mantissa must all be in one layout "
                  "(2-D plain or 3-D tiles), got shapes ", shape_str(w_mantissa[0].sizes()),
                  " and ", shape_str(w_mantissa[i].sizes()));
    if (tiled) {
      rows_of[i] = check_tiles(w_mantissa[i], w_exponent[i], w_bits, block_size, K, "w_mantissa",
                               "w_exponent");
    } else {
      CHECK_DIM(w_mantissa[i], 2);
      check_bfp_operand(w_mantissa[i], w_exponent[i], w_bits, block_size, K, "w_mantissa",
                        "w_exponent");
      rows_of[i] = w_mantissa[i].size(0);
    }
    const std::optional<at::Tensor> b = bias.get(i);
    if (!b.has_value()) continue;
    const int64_t N = rows_of[i];
    CHECK_DEVICE(*b, at::Device(at::kCPU));
    LLMCORE_CHECK(is_float_dtype(b->scalar_type()),
                  "bias must be float32, bfloat16 or float16, got ", b->scalar_type());
    LLMCORE_CHECK(b->dim() == 1 && b->size(0) == N, "bias[", i, "] must have shape [", N,
                  "] (w_mantissa[", i, "].size(0)), got ", shape_str(b->sizes()));
    b32[i] = b->to(at::kFloat).contiguous();
  }
  std::vector<at::Tensor> out;
  out.reserve(n_w);
  auto out_shape = [&](int64_t N) {
    std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
    s.back() = N;
    return s;
  };
  const int ab = static_cast<int>(a_bits), wb = static_cast<int>(w_bits);
  const int blk = static_cast<int>(block_size);
  // Prefill of tiled weights without AMX: the decode GEMV's kernels, every row of a chunk
  // against each 16-column tile while the tile sits in cache (per row the same sums as a
  // decode call: the same bits). The GEMM below unpacks the tiles and packs the weight
  // again on every call, which costs more: a 110M MXINT4 prompt of 128 tokens went from
  // 556-571 to 1102-1156 tokens/s at 2 threads (16 rows a call), and the 41M trained
  // MXINT8 model's 64-token prompt from 50 to 30 ms at 1 thread (all rows at once), on the
  // AMD EPYC VM. 8-bit weights only where the AVX-512 tile kernel reads the tiles (other
  // ISAs unpack each tile for the plain kernels, which for 8 bits was not measured).
  const bool tile_prefill = M > kLinearGemvMaxRows && tiled && cpu::gemv_q8_supported(ab, wb, blk) &&
                            !cpu::gemm_amx_supported(ab, wb, blk) && prefill_by_gemv() &&
                            (wb <= 4 || cpu::gemv_q8_plan_tiles(M, K, wb).tiles);
  if (!tile_prefill &&
      (M == 0 || M > kLinearGemvMaxRows || !cpu::gemv_q8_supported(ab, wb, blk))) {
    const at::Tensor x2 = x.reshape({M, K});
    auto [am, ae] = bfp_quantize_cpu(x2, a_bits, block_size, round_even);
    if (tiled && M > 0 && cpu::gemm_amx_supported(ab, wb, blk)) {
      // Prefill on AMX straight from the tiles: the activation rows laid out once.
      const cpu::GemmAmxPlan g = cpu::gemm_amx_plan(M, rows_of[0], K, wb);
      const auto opts = x.options();
      at::Tensor a_rows = at::empty({static_cast<int64_t>(cpu::gemm_amx_rows_bytes(g))},
                                    opts.dtype(at::kChar));
      at::Tensor a_scales = at::empty({g.m_tiles * g.nb * 16}, opts.dtype(at::kFloat));
      int8_t* arp = a_rows.data_ptr<int8_t>();
      float* asp = a_scales.data_ptr<float>();
      parallel_items(g.m_tiles, grain_rows(16 * K), [&](int64_t t0, int64_t t1) {
        cpu::gemm_amx_prepare_rows(g, am.data_ptr<int8_t>(), am.size(1), ae.data_ptr<uint8_t>(),
                                   ae.size(1), ab, arp, asp, t0, t1);
      });
      for (size_t i = 0; i < n_w; ++i) {
        const int64_t N = rows_of[i];
        at::Tensor y32 = at::empty({M, N}, opts.dtype(at::kFloat));
        const at::Tensor tm = w_mantissa[i].contiguous(), te = w_exponent[i].contiguous();
        const auto* tmp = static_cast<const uint8_t*>(tm.data_ptr());
        const auto* tep = te.data_ptr<uint8_t>();
        const float* bp = b32[i].defined() ? b32[i].data_ptr<float>() : nullptr;
        float* yp = y32.data_ptr<float>();
        // About 2 MFLOP per task, in whole 16-column tiles (as gemm_amx_cpu).
        const int64_t tile_flops = 2 * 16 * g.m_tiles * 16 * K;
        const int64_t chunk = 16 * std::max<int64_t>(1, (int64_t{2} << 20) / tile_flops);
        parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
          cpu::gemm_amx_tiles(g, arp, asp, tmp, tep, bp, yp, N, n0, n1);
        });
        out.push_back((x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type()))
                          .view(out_shape(N)));
      }
      return out;
    }
    for (size_t i = 0; i < n_w; ++i) {
      std::optional<at::Tensor> b;
      if (b32[i].defined()) b = b32[i];
      // Prefill: the GEMM kernels read the plain layout (tiles are unpacked for the call).
      at::Tensor wm = w_mantissa[i], we = w_exponent[i];
      if (tiled && M > 0) std::tie(wm, we) = untile(wm, we, w_bits, K);
      out.push_back(tiled && M == 0
                        ? at::empty(out_shape(rows_of[i]), x.options())
                        : bfp_gemm_cpu(am, ae, wm, we, a_bits, w_bits, block_size, K, b,
                                       x.scalar_type())
                              .view(out_shape(rows_of[i])));
    }
    return out;
  }
  // Decode (and tiled prefill): quantise x into scratch, lay it out once for every weight;
  // a prefill in chunks of rows whose layout stays in L2 while every tile meets them.
  const at::Tensor xc = x.contiguous();
  GemvScratch& s = gemv_scratch();
  const int64_t mcols = cpu::mantissa_cols(K, ab), ecols = cpu::exponent_cols(K, blk);
  const bool f32 = x.scalar_type() == at::kFloat;
  if (n_w == 1 && !tiled) {  // M <= 16 here
    auto* amp = grow(s.a_mant, M * mcols);
    auto* aep = grow(s.a_exp, M * ecols);
    cpu::quantize_rows(xc.data_ptr(), to_dtype(x.scalar_type()), K, K, ab, blk, round_even,
                       reinterpret_cast<uint8_t*>(amp), mcols, aep, ecols, 0, M);
    const cpu::GemvQ8Plan g = prepare_gemv_q8(s, M, K, ab, wb, amp, mcols, aep, ecols);
    const int64_t N = rows_of[0];
    at::Tensor y = at::empty(out_shape(N), x.options());
    if (N > 0) {
      float* yp = f32 ? y.data_ptr<float>() : grow(s.y32, M * N);
      run_gemv_q8(g, s, w_mantissa[0], w_exponent[0],
                  b32[0].defined() ? b32[0].data_ptr<float>() : nullptr, yp, N);
      if (!f32) convert_from_f32(yp, y.data_ptr(), x.scalar_type(), M * N);
    }
    out.push_back(y);
    return out;
  }
  // Several weights (q/k/v, gate/up): one parallel dispatch over all their column chunks,
  // not one per weight, so the threads meet once per call (per row chunk).
  struct Part {
    const uint8_t *m, *e;
    int64_t m_cols, e_cols, N, chunk, first_task;
    const float* bias;
    float* y;
  };
  // Rows per chunk: all of them when decoding; when prefilling, as many as keep their
  // layout (32 bytes per block of 32, about K bytes a row) within ~256 KB of L2, in
  // multiples of the kernel's 8-row tiles.
  const int64_t row_chunk = M <= kLinearGemvMaxRows
                                ? M
                                : std::clamp<int64_t>((int64_t{256} << 10) / K / 8 * 8, 16, 256);
  const int64_t chunk_rows = std::min(M, row_chunk);
  std::vector<at::Tensor> keep;  // contiguous copies, should a weight not be
  std::vector<Part> parts(n_w);
  int64_t tasks = 0, y32_total = 0;
  for (size_t i = 0; i < n_w; ++i) {
    const int64_t N = rows_of[i];
    out.push_back(at::empty(out_shape(N), x.options()));
    if (!f32) y32_total += chunk_rows * N;
  }
  // A 16-bit output: each chunk's fp32 product, converted into the output after the
  // chunk; decoding keeps it in the thread's scratch, a prefill in a buffer of the call's
  // (a chunk of a long prompt's rows would stay in the scratch for the thread's lifetime).
  at::Tensor y32_call;
  if (!f32 && M > kLinearGemvMaxRows)
    y32_call = at::empty({y32_total}, x.options().dtype(at::kFloat));
  float* y32 = f32                  ? nullptr
               : y32_call.defined() ? y32_call.data_ptr<float>()
                                    : grow(s.y32, y32_total);
  for (size_t i = 0, off = 0; i < n_w; ++i) {
    const at::Tensor bm = w_mantissa[i].contiguous(), be = w_exponent[i].contiguous();
    keep.push_back(bm);
    keep.push_back(be);
    Part& p = parts[i];
    p.m = static_cast<const uint8_t*>(bm.data_ptr());
    p.e = be.data_ptr<uint8_t>();
    p.N = rows_of[i];
    p.m_cols = tiled ? cpu::mantissa_cols(K, wb) : bm.size(1);
    p.e_cols = tiled ? K / 32 : be.size(1);
    const int64_t row = p.m_cols + p.e_cols;
    p.chunk = gemv_chunk_cols(p.N, row);
    p.first_task = tasks;
    tasks += (p.N + p.chunk - 1) / p.chunk;
    p.bias = b32[i].defined() ? b32[i].data_ptr<float>() : nullptr;
    p.y = f32 ? out[i].data_ptr<float>() : y32 + off;
    off += chunk_rows * p.N;
  }
  auto* amp = grow(s.a_mant, chunk_rows * mcols);
  auto* aep = grow(s.a_exp, chunk_rows * ecols);
  for (int64_t m0 = 0; m0 < M; m0 += row_chunk) {
    const int64_t mc = std::min(row_chunk, M - m0);
    cpu::quantize_rows(static_cast<const char*>(xc.data_ptr()) + m0 * K * xc.element_size(),
                       to_dtype(x.scalar_type()), K, K, ab, blk, round_even,
                       reinterpret_cast<uint8_t*>(amp), mcols, aep, ecols, 0, mc);
    const cpu::GemvQ8Plan g = prepare_gemv_q8(s, mc, K, ab, wb, amp, mcols, aep, ecols, tiled);
    const int8_t* xq = s.xq.data();
    const int32_t* corr = s.corr.data();
    const float* xs = s.xs.data();
    parallel_chunks(tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        size_t i = 0;
        while (i + 1 < n_w && parts[i + 1].first_task <= t) ++i;
        const Part& p = parts[i];
        const int64_t n0 = (t - p.first_task) * p.chunk, n1 = std::min(p.N, n0 + p.chunk);
        float* y = f32 ? p.y + m0 * p.N : p.y;
        if (tiled)  // chunks of whole tiles (gemv_chunk_cols: N, or a multiple of 16)
          cpu::gemv_q8_tiles(g, xq, corr, xs, p.m, p.e, p.bias, y, p.N, n0, n1);
        else
          cpu::gemv_q8(g, xq, corr, xs, p.m, p.m_cols, p.e, p.e_cols, p.bias, y, p.N, n0, n1);
      }
    });
    if (!f32)
      for (size_t i = 0; i < n_w; ++i) {
        char* rows = static_cast<char*>(out[i].data_ptr()) +
                     m0 * parts[i].N * out[i].element_size();
        convert_from_f32(parts[i].y, rows, x.scalar_type(), mc * parts[i].N);
      }
  }
  return out;
}

at::Tensor bfp_act_linear_cpu(const at::Tensor& x, const at::Tensor& w_mantissa,
                              const at::Tensor& w_exponent, int64_t a_bits, int64_t w_bits,
                              int64_t block_size, bool round_even,
                              const std::optional<at::Tensor>& bias) {
  c10::List<std::optional<at::Tensor>> b;
  b.push_back(bias);
  return bfp_act_linear_multi_cpu(x, {w_mantissa}, {w_exponent}, a_bits, w_bits, block_size,
                                  round_even, b)[0];
}

}  // namespace
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("bfp_quantize", &llmcore::bfp_quantize_cpu);
  m.impl("bfp_dequantize", &llmcore::bfp_dequantize_cpu);
  m.impl("bfp_linear", &llmcore::bfp_linear_cpu);
  m.impl("bfp_gemm", &llmcore::bfp_gemm_cpu);
  m.impl("bfp_act_linear", &llmcore::bfp_act_linear_cpu);
  m.impl("bfp_act_linear_multi", &llmcore::bfp_act_linear_multi_cpu);
  m.impl("bfp_tiles_pack", &llmcore::bfp_tiles_pack_cpu);
  m.impl("bfp_tiles_unpack", &llmcore::bfp_tiles_unpack_cpu);
  m.impl("bfp_embedding", &llmcore::bfp_embedding_cpu);
}
