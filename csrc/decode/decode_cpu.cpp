// CPU decode: run-time ISA choice, the split plan, the logsumexp merge of the splits, the
// portable task kernel (the definition the AVX-512 path reproduces to fp32 rounding) and
// the cache writes (MXINT8 via the per-element rule of bfp/bfp_rule.h, bit-exact).
#include "decode/decode_cpu_internal.h"

#include <math.h>
#include <string.h>

#include <vector>

#include "common/convert_rows.h"
#include "common/half_convert.h"
#include "bfp/bfp_rule.h"

namespace llmcore {
namespace decode {
namespace cpu {
namespace {

// Below this many positions per split the merge and the per-task setup cost more than
// the extra parallelism buys.
constexpr int64_t kMinChunk = 256;
constexpr int64_t kTile = 16;

// Row of d elements at element offset `off` of a cache (or exponent offset `eoff`) -> fp32.
void load_row(const void* base, const uint8_t* exp, DType t, int64_t off, int64_t eoff,
              int64_t d, float* dst) {
  if (t == kMxint8) {
    const int8_t* m = static_cast<const int8_t*>(base) + off;
    for (int64_t i = 0; i < d; ++i)
      dst[i] = static_cast<float>(m[i]) * bfp::block_scale(exp[eoff + i / kMxBlock], kMxBits);
    return;
  }
  for (int64_t i = 0; i < d; ++i) dst[i] = load_float(base, t, off + i);
}

}  // namespace

Isa active_isa() {
  const CpuFeatures& f = cpu_features();
  static const Isa best = f.avx512f && f.avx512bw && f.avx512vl ? Isa::kAvx512 : Isa::kScalar;
  return choose_isa(best, /*has_avx2=*/false);
}

DecodePlan decode_plan(const DecodeArgs& a, int threads) {
  DecodePlan p;
  const int64_t hkv = a.layout.hkv > 0 ? a.layout.hkv : 1;
  p.group = a.heads / hkv;
  p.rows = p.group * a.q_len;
  p.groups = a.batch * hkv;
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t n = clamped_length(a, b);
    if (n > longest) longest = n;
  }
  const int64_t want = 4 * static_cast<int64_t>(threads > 0 ? threads : 1);
  int64_t splits = p.groups > 0 && p.groups < want ? (want + p.groups - 1) / p.groups : 1;
  const int64_t most = (longest + kMinChunk - 1) / kMinChunk;
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  int64_t chunk = (longest + splits - 1) / splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  if (chunk < kTile) chunk = kTile;
  p.splits = (longest + chunk - 1) / chunk;
  if (p.splits < 1) p.splits = 1;
  p.chunk = chunk;
  p.tasks = p.groups * p.splits;
  return p;
}

size_t decode_workspace_floats(const DecodeArgs& a, const DecodePlan& p) {
  return static_cast<size_t>(p.tasks * p.rows * (a.head_dim + 1));
}

void decode_attention_tasks(const DecodeArgs& a, const DecodePlan& p, float* workspace,
                            int64_t t0, int64_t t1) {
#if defined(__x86_64__)
  if (active_isa() == Isa::kAvx512) {
    for (int64_t t = t0; t < t1; ++t) decode_task_avx512(a, p, workspace, t);
    return;
  }
#endif
  for (int64_t t = t0; t < t1; ++t) decode_task_scalar(a, p, workspace, t);
}

void decode_task_scalar(const DecodeArgs& a, const DecodePlan& p, float* ws, int64_t t) {
  const Task k = task_of(a, p, t);
  const int64_t R = p.rows, D = a.head_dim;
  const CacheLayout& c = a.layout;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(2 * R * D + 2 * R + 2 * D));
  float* q = buf.data();
  float* acc = q + R * D;
  float* m = acc + R * D;
  float* l = m + R;
  float* krow = l + R;
  float* vrow = krow + D;
  const DType qt = a.q_type;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t qo = q_offset(a, p, k.b, k.kvh, r);
    for (int64_t i = 0; i < D; ++i) q[r * D + i] = load_float(a.q, qt, qo + i) * a.scale;
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  memset(acc, 0, sizeof(float) * static_cast<size_t>(R * D));
  for (int64_t j = k.j0; j < k.j1; ++j) {
    const RowLoc loc = locate(c, k.b, j);
    if (loc.i0 < 0) continue;
    const int64_t off = loc.i0 * c.stride0 + loc.i1 * c.stride1 + k.kvh * c.stride2;
    const int64_t eoff = loc.i0 * c.exp_stride0 + loc.i1 * c.exp_stride1 + k.kvh * c.exp_stride2;
    load_row(a.k, a.k_exp, a.cache_type, off, eoff, D, krow);
    load_row(a.v, a.v_exp, a.cache_type, off, eoff, D, vrow);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t limit = k.length - a.q_len + r / p.group + 1;  // keys j < limit visible
      if (j >= limit) continue;
      float s = 0.0f;
      for (int64_t i = 0; i < D; ++i) s += q[r * D + i] * krow[i];
      float* o = acc + r * D;
      if (s > m[r]) {
        const float alpha = expf(m[r] - s);  // 0 when m was -inf
        for (int64_t i = 0; i < D; ++i) o[i] *= alpha;
        l[r] *= alpha;
        m[r] = s;
      }
      // A score of -inf weighs 0 (a row whose scores are all -inf sees no key, as in
      // attention), never exp(-inf - -inf) = NaN.
      const float w = s == -INFINITY ? 0.0f : expf(s - m[r]);
      l[r] += w;
      for (int64_t i = 0; i < D; ++i) o[i] += w * vrow[i];
    }
  }
  float* out = task_out(a, p, ws, t);
  float* lse = task_lse(a, p, ws, t);
  for (int64_t r = 0; r < R; ++r) {
    const bool any = l[r] != 0.0f;  // a NaN l (NaN in the cache) propagates
    const float inv = any ? 1.0f / l[r] : 0.0f;
    for (int64_t i = 0; i < D; ++i) out[r * D + i] = any ? acc[r * D + i] * inv : 0.0f;
    lse[r] = any ? m[r] + logf(l[r]) : -INFINITY;
  }
}

void decode_attention_merge(const DecodeArgs& a, const DecodePlan& p, const float* workspace,
                            void* out, float* lse, int64_t g0, int64_t g1) {
  const int64_t D = a.head_dim, S = p.splits;
  const DType ot = a.q_type;
  float* ws = const_cast<float*>(workspace);
  thread_local std::vector<float> acc, w;
  acc.resize(static_cast<size_t>(D));
  w.resize(static_cast<size_t>(S));
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t b = g / a.layout.hkv, kvh = g % a.layout.hkv;
    for (int64_t r = 0; r < p.rows; ++r) {
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        const float x = task_lse(a, p, ws, g * S + s)[r];
        if (x > mx || x != x) mx = x;  // NaN (from NaN in the cache) wins
        if (x != x) break;
      }
      const int64_t oo = q_offset(a, p, b, kvh, r);
      const int64_t h = kvh * p.group + r % p.group, t = r / p.group;
      float* lse_out = lse + (b * a.heads + h) * a.q_len + t;
      if (mx == -INFINITY) {
        for (int64_t i = 0; i < D; ++i) store_float(out, ot, oo + i, 0.0f);
        *lse_out = -INFINITY;
        continue;
      }
      if (S == 1) {
        const float* o = task_out(a, p, ws, g) + r * D;
        for (int64_t i = 0; i < D; ++i) store_float(out, ot, oo + i, o[i]);
        *lse_out = mx;
        continue;
      }
      float sum = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const float x = task_lse(a, p, ws, g * S + s)[r];
        w[s] = x == -INFINITY ? 0.0f : expf(x - mx);
        sum += w[s];
      }
      for (int64_t i = 0; i < D; ++i) acc[i] = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        if (w[s] == 0.0f) continue;
        const float* o = task_out(a, p, ws, g * S + s) + r * D;
        const float ws_ = w[s] / sum;
        for (int64_t i = 0; i < D; ++i) acc[i] += ws_ * o[i];
      }
      for (int64_t i = 0; i < D; ++i) store_float(out, ot, oo + i, acc[i]);
      *lse_out = mx + logf(sum);
    }
  }
}

int64_t kv_cache_append_rows(const AppendArgs& a, int64_t r0, int64_t r1) {
  const CacheLayout& c = a.layout;
  const int64_t D = c.d, H = c.hkv, cap = capacity(c);
  const int64_t nb = (D + kMxBlock - 1) / kMxBlock;
  const int64_t esize = dtype_size(a.cache_type);
  const DType st = a.src_type;
  int64_t skipped = 0;
  float xb[kMxBlock];
  constexpr int64_t kWiden = 256;
  float wide[kWiden];
  const bool vec = convert_vec();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.new_tokens, t = r % a.new_tokens;
    const int64_t pos = static_cast<int64_t>(a.start_pos[b]) + t;
    if (pos < 0 || pos >= cap) {
      ++skipped;
      continue;
    }
    const RowLoc loc = locate(c, b, pos);
    if (loc.i0 < 0) {
      ++skipped;
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t src_off = (r * H + h) * D;  // r = b * new_tokens + t
      const int64_t off = loc.i0 * c.stride0 + loc.i1 * c.stride1 + h * c.stride2;
      if (a.cache_type == st) {
        memcpy(static_cast<char*>(a.cache) + off * esize,
               static_cast<const char*>(a.src) + src_off * esize, static_cast<size_t>(D * esize));
        continue;
      }
      if (a.cache_type != kMxint8) {  // a float cache of another dtype: round to it
        char* dst = static_cast<char*>(a.cache) + off * esize;
        const char* src = static_cast<const char*>(a.src) + src_off * dtype_size(st);
        if (st == DType::kFloat32) {
          narrow_floats(reinterpret_cast<const float*>(src), a.cache_type, D, dst, vec);
          continue;
        }
        for (int64_t i0 = 0; i0 < D; i0 += kWiden) {  // 16-bit -> the other 16-bit type
          const int64_t n = D - i0 < kWiden ? D - i0 : kWiden;
          widen_floats(src + i0 * dtype_size(st), st, n, wide, vec);
          narrow_floats(wide, a.cache_type, n, dst + i0 * esize, vec);
        }
        continue;
      }
      int8_t* mant = static_cast<int8_t*>(a.cache) + off;
      uint8_t* er = a.exp + loc.i0 * c.exp_stride0 + loc.i1 * c.exp_stride1 + h * c.exp_stride2;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t i0 = blk * kMxBlock;
        const int64_t n = i0 + kMxBlock < D ? kMxBlock : D - i0;
        float amax = 0.0f;
        bool finite = true;
        for (int64_t i = 0; i < n; ++i) {
          xb[i] = load_float(a.src, st, src_off + i0 + i);
          const float v = __builtin_fabsf(xb[i]);
          if (!(v <= 3.4028234663852886e38f)) finite = false;  // Inf or NaN
          else if (v > amax) amax = v;
        }
        const int e = bfp::block_exponent(amax);
        er[blk] = finite ? static_cast<uint8_t>(e + bfp::kExpBias) : bfp::kNaNExponent;
        for (int64_t i = 0; i < n; ++i)
          mant[i0 + i] = static_cast<int8_t>(
              finite ? bfp::quantize_element(xb[i], e, kMxBits, /*round_even=*/false) : 0);
      }
    }
  }
  return skipped;
}

}  // namespace cpu
}  // namespace decode
}  // namespace llmcore
