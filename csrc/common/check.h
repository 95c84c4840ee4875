// Input checks for the torch bindings. Every message names the argument and gives the
// expected and the actual value, so a user never has to guess which tensor was wrong.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <sstream>

#include "common/dtype.h"

namespace llmcore {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

// "int8", "float32", ... as Python spells them (torch's own names are "Char", "Float").
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// The kernels' DType of a tensor dtype; the bindings check dtypes before they convert, so
// any other dtype here is an internal error.
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kChar: return DType::kInt8;
    default: TORCH_CHECK(false, "llmcore: no kernel dtype for ", dtype_name(t));
  }
}

}  // namespace llmcore

#define LLMCORE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

#define CHECK_DEVICE(x, dev)                                                              \
  TORCH_CHECK_VALUE((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())

#define CHECK_DTYPE(x, dt)                                                                \
  TORCH_CHECK_VALUE((x).scalar_type() == (dt), #x " must have dtype ",                    \
                    llmcore::dtype_name(dt), ", got ", llmcore::dtype_name((x).scalar_type()))

#define CHECK_DIM(x, n)                                                                   \
  TORCH_CHECK_VALUE((x).dim() == (n), #x " must have ", (n), " dims, got shape ",         \
                    llmcore::shape_str((x).sizes()))

#define CHECK_SIZE(x, d, expected)                                                        \
  TORCH_CHECK_VALUE((x).size(d) == (expected), #x ".size(" #d ") must be ", (expected),   \
                    ", got shape ", llmcore::shape_str((x).sizes()))

#define CHECK_LASTDIM_CONTIGUOUS(x)                                                       \
  TORCH_CHECK_VALUE((x).dim() == 0 || (x).stride(-1) == 1,                                \
                    #x " must be contiguous in its last dim, got strides ",               \
                    llmcore::shape_str((x).strides()))

#define CHECK_FLOAT_INPUT(x)                                                              \
  TORCH_CHECK_VALUE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 \
                        || (x).scalar_type() == at::kHalf,                                \
                    #x " must be float32, bfloat16 or float16, got ",                     \
                    llmcore::dtype_name((x).scalar_type()))
