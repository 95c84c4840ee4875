// The torch binding of the BFP CUDA kernels: TORCH_LIBRARY_IMPL(llmcore, CUDA, m) for
// bfp_quantize, bfp_dequantize, bfp_linear and bfp_gemm (schemas in csrc/ops.cpp).
// Checks every argument, makes the inputs contiguous, picks a path and calls the
// framework-free launchers of bfp_cuda.cuh on the current stream.
//
// Which path:
//   bfp_quantize / bfp_dequantize   always the CUDA kernels (bfp_quantize.cu).
//   bfp_linear, M <= 16             the streaming GEMV kernel (bfp_gemv.cu), any format.
//   bfp_linear, M > 16              W dequantised to x's dtype by the CUDA kernel (in chunks
//                                   of N when W would exceed 512 MB), then at::addmm/mm
//                                   (cuBLAS, fp32 accumulation; fp32 without TF32).
//   bfp_gemm, unpacked mantissas (5..8 bits) with block 16 or 32
//                                   int8 tensor cores (bfp_gemm_w8a8.cu); K is padded to a
//                                   multiple of 16 bytes first when it is not.
//   bfp_gemm, anything else (packed 4-bit operands, block 8, odd blocks)
//                                   both operands dequantised to fp32 and at::mm in fp32
//                                   under at::NoTF32Guard, bias added in fp32.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bfp/bfp_cuda.cuh"
#include "common/check.h"
#include "common/cuda_check.h"

namespace llmcore {
namespace bfp {
namespace {

namespace kc = llmcore::bfp::cuda;

void check_format(int64_t bits, int64_t block, const char* bits_name) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, bits_name, " must be in [2, 8], got ", bits);
  TORCH_CHECK_VALUE(block >= 1 && block <= 1024, "block_size must be in [1, 1024], got ", block);
}

// An output dtype the kernels can write (checked before to_dtype converts it).
void check_float_dtype(at::ScalarType t) {
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
                    "dtype must be float32, bfloat16 or float16, got ", t);
}

int64_t mantissa_cols(int64_t k, int64_t bits) { return bits <= 4 ? (k + 1) / 2 : k; }
at::ScalarType mantissa_dtype(int64_t bits) { return bits <= 4 ? at::kByte : at::kChar; }
int64_t exponent_cols(int64_t k, int64_t block) { return (k + block - 1) / block; }

// A BFP operand (mantissa, exponent) of logical last dim k: dtypes and shapes.
void check_bfp_operand(const at::Tensor& mantissa, const at::Tensor& exponent, int64_t bits,
                       int64_t block, int64_t k, const char* name) {
  const int64_t mcols = mantissa_cols(k, bits), ecols = exponent_cols(k, block);
  TORCH_CHECK_VALUE(mantissa.scalar_type() == mantissa_dtype(bits), name,
                    " mantissa must have dtype ", mantissa_dtype(bits), " for ", bits,
                    "-bit mantissas, got ", mantissa.scalar_type());
  TORCH_CHECK_VALUE(exponent.scalar_type() == at::kByte, name,
                    " exponent must have dtype uint8, got ", exponent.scalar_type());
  TORCH_CHECK_VALUE(mantissa.dim() >= 1 && mantissa.size(-1) == mcols, name,
                    " mantissa must have last dim ", mcols, " (k = ", k, ", ", bits,
                    " bits), got shape ", shape_str(mantissa.sizes()));
  TORCH_CHECK_VALUE(exponent.dim() == mantissa.dim() && exponent.size(-1) == ecols &&
                        exponent.sizes().slice(0, exponent.dim() - 1) ==
                            mantissa.sizes().slice(0, mantissa.dim() - 1),
                    name, " exponent must have shape ", shape_str(mantissa.sizes().slice(0, mantissa.dim() - 1)),
                    " + [", ecols, "] (k = ", k, ", block_size = ", block, "), got ",
                    shape_str(exponent.sizes()));
}

// Contiguous 2-D [rows, k] dequantisation into a new tensor of dtype.
at::Tensor dequantize_rows(const at::Tensor& mantissa, const at::Tensor& exponent, int64_t bits,
                           int64_t block, int64_t k, at::ScalarType dtype) {
  const int64_t rows = mantissa.size(0);
  at::Tensor y = at::empty({rows, k}, mantissa.options().dtype(dtype));
  const cudaError_t err = kc::dequantize(
      mantissa.data_ptr(), mantissa.size(1), exponent.data_ptr<uint8_t>(), exponent.size(1), rows,
      k, static_cast<int>(bits), static_cast<int>(block), y.data_ptr(), to_dtype(dtype), k,
      current_stream());
  CHECK_LAUNCH(err, "bfp_dequantize");
  return y;
}

std::tuple<at::Tensor, at::Tensor> bfp_quantize_cuda(const at::Tensor& x, int64_t mantissa_bits,
                                                     int64_t block_size, bool round_even) {
  CHECK_CUDA(x);
  CHECK_FLOAT_INPUT(x);
  check_format(mantissa_bits, block_size, "mantissa_bits");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0,
                    "x must have a non-empty last axis to quantise, got shape ", shape_str(x.sizes()));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t k = xc.size(-1);
  const int64_t rows = k == 0 ? 0 : xc.numel() / k;
  std::vector<int64_t> mshape(x.sizes().begin(), x.sizes().end());
  std::vector<int64_t> eshape = mshape;
  mshape.back() = mantissa_cols(k, mantissa_bits);
  eshape.back() = exponent_cols(k, block_size);
  at::Tensor mantissa = at::empty(mshape, x.options().dtype(mantissa_dtype(mantissa_bits)));
  at::Tensor exponent = at::empty(eshape, x.options().dtype(at::kByte));
  if (rows == 0) return {mantissa, exponent};
  const cudaError_t err = kc::quantize(
      xc.data_ptr(), to_dtype(xc.scalar_type()), rows, k, k, static_cast<int>(mantissa_bits),
      static_cast<int>(block_size), round_even, mantissa.data_ptr(), mshape.back(),
      exponent.data_ptr<uint8_t>(), eshape.back(), current_stream());
  CHECK_LAUNCH(err, "bfp_quantize");
  return {mantissa, exponent};
}

at::Tensor bfp_dequantize_cuda(const at::Tensor& mantissa, const at::Tensor& exponent,
                               int64_t mantissa_bits, int64_t block_size, int64_t k,
                               at::ScalarType dtype) {
  CHECK_CUDA(mantissa);
  CHECK_SAME_DEVICE(mantissa, exponent);
  check_format(mantissa_bits, block_size, "mantissa_bits");
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  check_float_dtype(dtype);
  check_bfp_operand(mantissa, exponent, mantissa_bits, block_size, k, "bfp_dequantize:");
  const c10::cuda::CUDAGuard guard(mantissa.device());
  std::vector<int64_t> shape(mantissa.sizes().begin(), mantissa.sizes().end());
  shape.back() = k;
  const int64_t rows = k == 0 ? 0 : mantissa.numel() / mantissa.size(-1);
  if (rows == 0) return at::empty(shape, mantissa.options().dtype(dtype));
  const at::Tensor m2 = mantissa.contiguous().view({rows, mantissa.size(-1)});
  const at::Tensor e2 = exponent.contiguous().view({rows, exponent.size(-1)});
  return dequantize_rows(m2, e2, mantissa_bits, block_size, k, dtype).view(shape);
}

// fp16 has 5 exponent bits: a BFP weight dequantises exactly to fp16 only if every block's
// values m * 2^(e-(bits-2)) lie within fp16's range (smallest subnormal 2^-24, largest
// 65504, i.e. e <= 15). Otherwise the M > 16 path multiplies in fp32 (exact, slower).
// Blocks with exponent byte 0 (all-zero or below 2^-126) and 255 (NaN) are left out:
// they are exact (zeros), negligible, or NaN whatever the dtype. One small reduction and
// one host sync per call.
at::ScalarType cublas_weight_dtype(at::ScalarType x_dtype, const at::Tensor& w_exponent,
                                   int64_t bits) {
  if (x_dtype != at::kHalf || w_exponent.numel() == 0) return x_dtype;
  const at::Tensor e = w_exponent.to(at::kInt);
  const at::Tensor live = (e > 0) & (e < 255);
  const at::Tensor range =
      at::stack({at::where(live, e, 255).min(), at::where(live, e, 0).max()}).cpu();
  const int lo = range[0].item<int>() - 127 - static_cast<int>(bits - 2);
  const int hi = range[1].item<int>() - 127;
  const bool any_live = range[1].item<int>() > 0;
  return (!any_live || (lo >= -24 && hi <= 15)) ? at::kHalf : at::kFloat;
}

at::Tensor bfp_linear_cuda(const at::Tensor& x, const at::Tensor& w_mantissa,
                           const at::Tensor& w_exponent, int64_t mantissa_bits,
                           int64_t block_size, const std::optional<at::Tensor>& bias_opt) {
  CHECK_CUDA(x);
  CHECK_FLOAT_INPUT(x);
  CHECK_DIM(x, 2);
  CHECK_SAME_DEVICE(x, w_mantissa);
  CHECK_SAME_DEVICE(x, w_exponent);
  CHECK_DIM(w_mantissa, 2);
  CHECK_DIM(w_exponent, 2);
  check_format(mantissa_bits, block_size, "mantissa_bits");
  const int64_t m = x.size(0), k = x.size(1), n = w_mantissa.size(0);
  check_bfp_operand(w_mantissa, w_exponent, mantissa_bits, block_size, k, "bfp_linear: w");
  at::Tensor bias;
  if (bias_opt.has_value()) {
    bias = *bias_opt;
    CHECK_SAME_DEVICE(x, bias);
    CHECK_FLOAT_INPUT(bias);
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == n, "bias must have shape [", n,
                      "], got ", shape_str(bias.sizes()));
    bias = bias.to(x.scalar_type()).contiguous();  // the Python face passes it in x's dtype
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const at::Tensor wm = w_mantissa.contiguous(), we = w_exponent.contiguous();

  if (m <= kc::kSmallMMax) {
    const at::Tensor xc = x.contiguous();
    const cudaError_t err = kc::linear_small_m(
        xc.data_ptr(), to_dtype(x.scalar_type()), m, k, k, wm.data_ptr(), wm.size(1),
        we.data_ptr<uint8_t>(), we.size(1), n, static_cast<int>(mantissa_bits),
        static_cast<int>(block_size), bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(),
        n, current_stream());
    CHECK_LAUNCH(err, "bfp_linear");
    return y;
  }

  // M > 16: compute bound; dequantise W in chunks of rows and let cuBLAS multiply, in x's
  // dtype when W is exact in it, else in fp32 (see cublas_weight_dtype).
  const at::ScalarType wdtype = cublas_weight_dtype(x.scalar_type(), we, mantissa_bits);
  const at::Tensor xw = x.scalar_type() == wdtype ? x : x.to(wdtype);
  const at::Tensor bw = !bias.defined() || bias.scalar_type() == wdtype ? bias : bias.to(wdtype);
  std::optional<at::NoTF32Guard> no_tf32;
  if (wdtype == at::kFloat) no_tf32.emplace();
  const int64_t row_bytes = std::max<int64_t>(k, 1) * xw.element_size();
  const int64_t chunk = std::max<int64_t>(1, (int64_t{512} << 20) / row_bytes);
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t rows = std::min(chunk, n - n0);
    const at::Tensor w = dequantize_rows(wm.narrow(0, n0, rows), we.narrow(0, n0, rows),
                                         mantissa_bits, block_size, k, wdtype);
    at::Tensor part = bw.defined() ? at::addmm(bw.narrow(0, n0, rows), xw, w.t())
                                   : at::mm(xw, w.t());
    if (rows == n && wdtype == x.scalar_type()) return part;
    y.narrow(1, n0, rows).copy_(part);
  }
  return y;
}

at::Tensor bfp_gemm_cuda(const at::Tensor& a_mantissa, const at::Tensor& a_exponent,
                         const at::Tensor& b_mantissa, const at::Tensor& b_exponent,
                         int64_t a_bits, int64_t b_bits, int64_t block_size, int64_t k,
                         const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  CHECK_CUDA(a_mantissa);
  CHECK_SAME_DEVICE(a_mantissa, a_exponent);
  CHECK_SAME_DEVICE(a_mantissa, b_mantissa);
  CHECK_SAME_DEVICE(a_mantissa, b_exponent);
  CHECK_DIM(a_mantissa, 2);
  CHECK_DIM(b_mantissa, 2);
  check_format(a_bits, block_size, "a_bits");
  check_format(b_bits, block_size, "b_bits");
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  check_float_dtype(out_dtype);
  check_bfp_operand(a_mantissa, a_exponent, a_bits, block_size, k, "bfp_gemm: a");
  check_bfp_operand(b_mantissa, b_exponent, b_bits, block_size, k, "bfp_gemm: b");
  const int64_t m = a_mantissa.size(0), n = b_mantissa.size(0);
  at::Tensor bf;
  if (bias.has_value()) {
    CHECK_SAME_DEVICE(a_mantissa, *bias);
    CHECK_FLOAT_INPUT(*bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape [", n,
                      "], got ", shape_str(bias->sizes()));
    bf = bias->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(a_mantissa.device());
  if (m == 0 || n == 0) return at::empty({m, n}, a_mantissa.options().dtype(out_dtype));

  if (kc::gemm_int8_supported(static_cast<int>(a_bits), static_cast<int>(b_bits),
                              static_cast<int>(block_size))) {
    // The kernel wants 16-byte aligned rows; pad K with zeros (never read past k anyway).
    auto aligned = [](const at::Tensor& t) {
      at::Tensor c = t.contiguous();
      const int64_t pad = (16 - c.size(1) % 16) % 16;
      if (pad != 0) return at::constant_pad_nd(c, {0, pad}, 0);
      if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) return c.clone();
      return c;
    };
    const at::Tensor a = aligned(a_mantissa), bm = aligned(b_mantissa);
    const at::Tensor ae = a_exponent.contiguous(), be = b_exponent.contiguous();
    at::Tensor y = at::empty({m, n}, a_mantissa.options().dtype(out_dtype));
    const cudaError_t err = kc::gemm_int8(
        a.data_ptr<int8_t>(), a.size(1), ae.data_ptr<uint8_t>(), ae.size(1),
        bm.data_ptr<int8_t>(), bm.size(1), be.data_ptr<uint8_t>(), be.size(1), m, n, k,
        static_cast<int>(a_bits), static_cast<int>(b_bits), static_cast<int>(block_size),
        bf.defined() ? bf.data_ptr<float>() : nullptr, y.data_ptr(), to_dtype(out_dtype), n,
        current_stream());
    CHECK_LAUNCH(err, "bfp_gemm");
    return y;
  }

  // Fallback: exact fp32 dequantisation of both operands, fp32 GEMM without TF32.
  const at::NoTF32Guard no_tf32;
  const at::Tensor a = dequantize_rows(a_mantissa.contiguous(), a_exponent.contiguous(), a_bits,
                                       block_size, k, at::kFloat);
  const at::Tensor bw = dequantize_rows(b_mantissa.contiguous(), b_exponent.contiguous(), b_bits,
                                        block_size, k, at::kFloat);
  at::Tensor y = bf.defined() ? at::addmm(bf, a, bw.t()) : at::mm(a, bw.t());
  return y.to(out_dtype);
}

}  // namespace
}  // namespace bfp
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("bfp_quantize", &llmcore::bfp::bfp_quantize_cuda);
  m.impl("bfp_dequantize", &llmcore::bfp::bfp_dequantize_cuda);
  m.impl("bfp_linear", &llmcore::bfp::bfp_linear_cuda);
  m.impl("bfp_gemm", &llmcore::bfp::bfp_gemm_cuda);
}
