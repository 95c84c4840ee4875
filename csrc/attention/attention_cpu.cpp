// The CPU attention algorithm (see attention_cpu.h): work items, tiles, online softmax and
// the two deterministic backward passes, built from the per-ISA tile primitives of
// attention_cpu_internal.h. Run-time ISA choice lives here too.
#include <math.h>

#include <algorithm>
#include <vector>

#include "attention/attention_cpu_internal.h"

namespace llmcore {
namespace attention {
namespace cpu {
namespace {

const Kernels& kernels() {
#if defined(__x86_64__)
  if (active_isa() == Isa::kAvx512) return avx512::kKernels;
#endif
  return scalar::kKernels;
}

constexpr float kNegInf = -INFINITY;

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned fp32 scratch for one range of work items.
class Scratch {
 public:
  explicit Scratch(size_t n) : buf_(n + 16) {}
  float* get() {
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf_.data());
    return reinterpret_cast<float*>((a + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<float> buf_;
};

// One sequence: token offsets and lengths of its queries and keys.
struct Seq {
  int64_t q0, lq, k0, lk;
};

Seq sequence(const Problem& p, int64_t b) {
  if (p.cu_seqlens_q) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    return {q0, p.cu_seqlens_q[b + 1] - q0, k0, p.cu_seqlens_k[b + 1] - k0};
  }
  return {0, p.seq_q, 0, p.seq_k};
}

// Address of row `t` (token) of head h of batch b.
const void* row_ptr(const ConstView& v, DType t, int64_t b, int64_t tok, int64_t h) {
  return static_cast<const char*>(v.data) +
         (b * v.batch_stride + tok * v.row_stride + h * v.head_stride) *
             static_cast<int64_t>(dtype_size(t));
}
void* row_ptr(const View& v, DType t, int64_t b, int64_t tok, int64_t h) {
  return static_cast<char*>(v.data) +
         (b * v.batch_stride + tok * v.row_stride + h * v.head_stride) *
             static_cast<int64_t>(dtype_size(t));
}

int64_t lse_index(const Problem& p, int64_t b, int64_t h, int64_t tok) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + tok;
}

// Query item -> (b, h, query block). Within a (b, h) the blocks alternate low / high
// (0, n-1, 1, n-2, ...), so a contiguous range of items has balanced causal work.
struct QItem {
  int64_t b, h, qb;
};
QItem query_item(const Problem& p, int64_t item) {
  const int64_t nqb = ceil_div(p.max_seqlen_q, kBlockQ);
  const int64_t bh = item / nqb, t = item % nqb;
  return {bh / p.heads, bh % p.heads, (t % 2 == 0) ? t / 2 : nqb - 1 - t / 2};
}

// Keys that row i (local index) of a sequence sees: [0, visible_keys).
int64_t visible_keys(const Problem& p, const Seq& s, int64_t i) {
  if (!p.causal) return s.lk;
  return std::clamp<int64_t>(i + 1 + s.lk - s.lq, 0, s.lk);
}

// P = exp(S - lse) on the keys row r sees (zero elsewhere), and with dp given,
// dS = P * (dP - delta) into dp, also zero where hidden (dP of a hidden key may be NaN from a
// masked value). Rows are of width kBlockK; keys j0 .. j0 + nk. Returns whether any entry
// was hidden (the tile's products must then skip zeros).
bool probs_and_dscores(const Kernels& kn, const Problem& p, const Seq& s, int64_t i0,
                       int64_t rows, int64_t j0, int64_t nk, const float* lse,
                       const float* delta, float* sp, float* dp) {
  bool hidden = false;
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = sp + r * kBlockK;
    const int64_t lim = std::min<int64_t>(nk, visible_keys(p, s, i0 + r) - j0);
    const float lr = lse[r];
    int64_t j = 0;
    if (lim > 0 && lr != kNegInf) {
      kn.exp_row(pr, lim, lr, pr);
      j = lim;
    }
    hidden |= j < nk;
    for (int64_t x = j; x < nk; ++x) pr[x] = 0.0f;
    if (dp) {
      float* dr = dp + r * kBlockK;
      const float dl = delta[r];
      for (int64_t x = 0; x < j; ++x) dr[x] = pr[x] * (dr[x] - dl);
      for (int64_t x = j; x < nk; ++x) dr[x] = 0.0f;
    }
  }
  return hidden;
}

}  // namespace

Isa active_isa() {
  static const Isa best =
      cpu_features().avx512f && cpu_features().fma ? Isa::kAvx512 : Isa::kScalar;
  return choose_isa(best, /*has_avx2=*/false);
}

int64_t fwd_items(const Problem& p) {
  return p.batch * p.heads * ceil_div(p.max_seqlen_q, kBlockQ);
}

int64_t bwd_kv_items(const Problem& p) {
  return p.batch * p.kv_heads * ceil_div(p.max_seqlen_k, kBlockK);
}

// Scores are computed transposed, S^T = K (scale Q)^T: Q^T is built once per query block
// and K rows are read in place (fp32) or converted without a transpose, and the online
// softmax then runs along vectors of 16 queries.
void attention_fwd(const Problem& p, View out, float* lse, int64_t item_begin, int64_t item_end) {
  const Kernels& kn = kernels();
  const int64_t D = p.head_dim, Dp = round16(D), group = p.heads / p.kv_heads;
  const bool f32 = p.dtype == DType::kFloat32;
  const bool k_direct = f32, v_direct = f32 && D % 16 == 0;
  Scratch scratch(static_cast<size_t>(D * kBlockQ + 2 * kBlockK * Dp + kBlockK * kBlockQ +
                                      kBlockQ * Dp + 3 * kBlockQ));
  float* const qt = scratch.get();                  // [D][kBlockQ], scaled
  float* const kb = qt + D * kBlockQ;               // [kBlockK][Dp] (converted K)
  float* const vb = kb + kBlockK * Dp;              // [kBlockK][Dp] (converted V)
  float* const st = vb + kBlockK * Dp;              // [kBlockK][kBlockQ]: S^T, then P^T
  float* const ot = st + kBlockK * kBlockQ;         // [kBlockQ][Dp]
  float* const mrow = ot + kBlockQ * Dp;
  float* const lrow = mrow + kBlockQ;
  float* const alpha = lrow + kBlockQ;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const QItem it = query_item(p, item);
    const Seq s = sequence(p, it.b);
    const int64_t i0 = it.qb * kBlockQ;
    if (i0 >= s.lq) continue;
    const int64_t rows = std::min(kBlockQ, s.lq - i0), hk = it.h / group;
    const int64_t ncols = (rows + 63) / 64 * 64;
    kn.load_rows_t(row_ptr(p.q, p.dtype, it.b, s.q0 + i0, it.h), p.dtype, p.q.row_stride, rows,
                   D, p.scale, qt, kBlockQ);
    std::fill(ot, ot + rows * Dp, 0.0f);
    std::fill(mrow, mrow + rows, kNegInf);
    std::fill(lrow, lrow + rows, 0.0f);
    const int64_t kend = visible_keys(p, s, i0 + rows - 1);
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const void* kp = row_ptr(p.k, p.dtype, it.b, s.k0 + j0, hk);
      const void* vp = row_ptr(p.v, p.dtype, it.b, s.k0 + j0, hk);
      const float* ka = static_cast<const float*>(kp);
      int64_t lda = p.k.row_stride;
      if (!k_direct) {
        kn.load_rows(kp, p.dtype, p.k.row_stride, nk, D, 1.0f, kb, Dp);
        ka = kb;
        lda = Dp;
      }
      const float* va = static_cast<const float*>(vp);
      int64_t ldv = p.v.row_stride;
      if (!v_direct) {
        kn.load_rows(vp, p.dtype, p.v.row_stride, nk, D, 1.0f, vb, Dp);
        va = vb;
        ldv = Dp;
      }
      kn.dot_tile(ka, lda, nk, D, qt, kBlockQ, ncols, st, kBlockQ);
      // Key j0 + j is hidden from query i0 + i when i < j0 - i0 - (lk - lq) + j.
      const int64_t cut = p.causal ? j0 - i0 - (s.lk - s.lq) : -(int64_t{1} << 40);
      kn.softmax_t(st, kBlockQ, nk, rows, cut, mrow, lrow, alpha);
      // Some (query, key) of the tile is hidden when i < cut + j for i = 0, j = nk - 1.
      const bool hidden = cut + nk - 1 > 0;
      for (int64_t r = 0; r < rows; ++r) {
        if (alpha[r] == 1.0f) continue;
        float* orow = ot + r * Dp;
        for (int64_t d = 0; d < Dp; ++d) orow[d] *= alpha[r];
      }
      kn.axpy_tile(st, 1, kBlockQ, rows, nk, va, ldv, Dp, ot, Dp, hidden);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const bool any = lrow[r] != 0.0f;  // l is NaN when the row saw a NaN: it propagates
      store_row(ot + r * Dp, D, any ? 1.0f / lrow[r] : 0.0f,
                row_ptr(out, p.dtype, it.b, s.q0 + i0 + r, it.h), p.dtype);
      lse[lse_index(p, it.b, it.h, s.q0 + i0 + r)] = any ? mrow[r] + logf(lrow[r]) : kNegInf;
    }
  }
}

void attention_bwd_delta(const Problem& p, const Backward& g, int64_t item_begin,
                         int64_t item_end) {
  const Kernels& kn = kernels();
  for (int64_t item = item_begin; item < item_end; ++item) {
    const QItem it = query_item(p, item);
    const Seq s = sequence(p, it.b);
    const int64_t i0 = it.qb * kBlockQ;
    for (int64_t i = i0; i < std::min(s.lq, i0 + kBlockQ); ++i) {
      const void* o = row_ptr(g.out, p.dtype, it.b, s.q0 + i, it.h);
      const void* d = row_ptr(g.grad_out, p.dtype, it.b, s.q0 + i, it.h);
      g.delta[lse_index(p, it.b, it.h, s.q0 + i)] = kn.dot_row(d, o, p.dtype, p.head_dim);
    }
  }
}

namespace {

// Step 1 of the backward for key blocks of one (b, kv head). Item = (b, hk, key block), or
// with `fused` item = (b, hk) over all its key blocks, also accumulating dQ of the group's
// query heads (in a fixed order: deterministic) so that dQ needs no second pass.
void kv_pass(const Problem& p, const Backward& g, int64_t item_begin, int64_t item_end,
             bool fused) {
  const Kernels& kn = kernels();
  const int64_t D = p.head_dim, Dp = round16(D), group = p.heads / p.kv_heads;
  const int64_t nkb = ceil_div(p.max_seqlen_k, kBlockK);
  Scratch scratch(static_cast<size_t>(3 * kBlockK * Dp + 3 * kBlockQ * Dp + 2 * kBlockQ * kBlockK +
                                      4 * kBlockK * Dp + 2 * kBlockQ));
  float* const kt = scratch.get();               // [D][kBlockK]
  float* const vt = kt + kBlockK * Dp;           // [D][kBlockK]
  float* const kr = vt + kBlockK * Dp;           // [kBlockK][Dp] (fused: dQ += dS K)
  float* const qt = kr + kBlockK * Dp;           // [kBlockQ][Dp], scaled
  float* const dot = qt + kBlockQ * Dp;          // [kBlockQ][Dp]
  float* const dq_part = dot + kBlockQ * Dp;     // [kBlockQ][Dp]
  float* const st = dq_part + kBlockQ * Dp;      // [kBlockQ][kBlockK]: S, then P
  float* const dpt = st + kBlockQ * kBlockK;     // [kBlockQ][kBlockK]: dP, then dS
  float* const dk = dpt + kBlockQ * kBlockK;     // [kBlockK][Dp]
  float* const dv = dk + kBlockK * Dp;           // [kBlockK][Dp]
  float* const dk_part = dv + kBlockK * Dp;      // [kBlockK][Dp]: one query block's share
  float* const dv_part = dk_part + kBlockK * Dp;
  float* const lr = dv_part + kBlockK * Dp;
  float* const dl = lr + kBlockQ;
  std::vector<float> dq_acc;                     // fused: [group][lq][Dp]
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t per_head = fused ? 1 : nkb;
    const int64_t b = item / (p.kv_heads * per_head), hk = item / per_head % p.kv_heads;
    const Seq s = sequence(p, b);
    int64_t kb_begin = item % per_head, kb_end = kb_begin + 1;
    if (fused) {
      kb_begin = 0;
      kb_end = ceil_div(s.lk, kBlockK);
      dq_acc.assign(static_cast<size_t>(group * s.lq * Dp), 0.0f);
    }
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * kBlockK;
    if (j0 >= s.lk) continue;
    const int64_t nk = std::min(kBlockK, s.lk - j0);
    const void* kp = row_ptr(p.k, p.dtype, b, s.k0 + j0, hk);
    kn.load_rows_t(kp, p.dtype, p.k.row_stride, nk, D, 1.0f, kt, kBlockK);
    kn.load_rows_t(row_ptr(p.v, p.dtype, b, s.k0 + j0, hk), p.dtype, p.v.row_stride, nk, D, 1.0f,
                   vt, kBlockK);
    if (fused) kn.load_rows(kp, p.dtype, p.k.row_stride, nk, D, 1.0f, kr, Dp);
    std::fill(dk, dk + nk * Dp, 0.0f);
    std::fill(dv, dv + nk * Dp, 0.0f);
    // The first query that sees key j0 (causal): i + lk - lq >= j0.
    const int64_t qstart = p.causal ? std::max<int64_t>(0, j0 - (s.lk - s.lq)) : 0;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t i0 = qstart / kBlockQ * kBlockQ; i0 < s.lq; i0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, s.lq - i0);
        kn.load_rows(row_ptr(p.q, p.dtype, b, s.q0 + i0, h), p.dtype, p.q.row_stride, rows, D,
                     p.scale, qt, Dp);
        kn.load_rows(row_ptr(g.grad_out, p.dtype, b, s.q0 + i0, h), p.dtype,
                     g.grad_out.row_stride, rows, D, 1.0f, dot, Dp);
        for (int64_t r = 0; r < rows; ++r) {
          lr[r] = g.lse[lse_index(p, b, h, s.q0 + i0 + r)];
          dl[r] = g.delta[lse_index(p, b, h, s.q0 + i0 + r)];
        }
        kn.dot_tile(qt, Dp, rows, D, kt, kBlockK, kBlockK, st, kBlockK);
        kn.dot_tile(dot, Dp, rows, D, vt, kBlockK, kBlockK, dpt, kBlockK);
        const bool hidden = probs_and_dscores(kn, p, s, i0, rows, j0, nk, lr, dl, st, dpt);
        // Blocked sums (a partial per query block) keep the fp32 rounding error near that of
        // a blocked GEMM instead of growing with seq_q * group.
        std::fill(dk_part, dk_part + nk * Dp, 0.0f);
        std::fill(dv_part, dv_part + nk * Dp, 0.0f);
        kn.axpy_tile(st, 1, kBlockK, nk, rows, dot, Dp, Dp, dv_part, Dp, hidden);  // P^T dO
        kn.axpy_tile(dpt, 1, kBlockK, nk, rows, qt, Dp, Dp, dk_part, Dp, hidden);  // dS^T sQ
        for (int64_t x = 0; x < nk * Dp; ++x) {
          dk[x] += dk_part[x];
          dv[x] += dv_part[x];
        }
        if (fused) {
          std::fill(dq_part, dq_part + rows * Dp, 0.0f);
          kn.axpy_tile(dpt, kBlockK, 1, rows, nk, kr, Dp, Dp, dq_part, Dp, hidden);  // dS K
          float* dq = dq_acc.data() + ((h - hk * group) * s.lq + i0) * Dp;
          for (int64_t x = 0; x < rows * Dp; ++x) dq[x] += dq_part[x];
        }
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      store_row(dk + j * Dp, D, 1.0f, row_ptr(g.grad_k, p.dtype, b, s.k0 + j0 + j, hk), p.dtype);
      store_row(dv + j * Dp, D, 1.0f, row_ptr(g.grad_v, p.dtype, b, s.k0 + j0 + j, hk), p.dtype);
    }
    }
    if (!fused) continue;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
      for (int64_t i = 0; i < s.lq; ++i)
        store_row(dq_acc.data() + ((h - hk * group) * s.lq + i) * Dp, D, p.scale,
                  row_ptr(g.grad_q, p.dtype, b, s.q0 + i, h), p.dtype);
  }
}

}  // namespace

bool bwd_fused(const Problem& p) { return p.batch * p.kv_heads >= kFusedMinItems; }

int64_t bwd_fused_items(const Problem& p) { return p.batch * p.kv_heads; }

void attention_bwd_fused(const Problem& p, const Backward& g, int64_t item_begin,
                         int64_t item_end) {
  kv_pass(p, g, item_begin, item_end, true);
}

void attention_bwd_kv(const Problem& p, const Backward& g, int64_t item_begin, int64_t item_end) {
  kv_pass(p, g, item_begin, item_end, false);
}



void attention_bwd_q(const Problem& p, const Backward& g, int64_t item_begin, int64_t item_end) {
  const Kernels& kn = kernels();
  const int64_t D = p.head_dim, Dp = round16(D), group = p.heads / p.kv_heads;
  Scratch scratch(static_cast<size_t>(3 * kBlockK * Dp + 4 * kBlockQ * Dp + 2 * kBlockQ * kBlockK +
                                      2 * kBlockQ));
  float* const kt = scratch.get();               // [D][kBlockK]
  float* const vt = kt + kBlockK * Dp;           // [D][kBlockK]
  float* const kr = vt + kBlockK * Dp;           // [kBlockK][Dp]
  float* const qt = kr + kBlockK * Dp;           // [kBlockQ][Dp], scaled
  float* const dot = qt + kBlockQ * Dp;          // [kBlockQ][Dp]
  float* const dq = dot + kBlockQ * Dp;          // [kBlockQ][Dp]
  float* const st = dq + kBlockQ * Dp;           // [kBlockQ][kBlockK]
  float* const dpt = st + kBlockQ * kBlockK;     // [kBlockQ][kBlockK]
  float* const dq_part = dpt + kBlockQ * kBlockK; // [kBlockQ][Dp]: one key tile's share
  float* const lr = dq_part + kBlockQ * Dp;
  float* const dl = lr + kBlockQ;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const QItem it = query_item(p, item);
    const Seq s = sequence(p, it.b);
    const int64_t i0 = it.qb * kBlockQ;
    if (i0 >= s.lq) continue;
    const int64_t rows = std::min(kBlockQ, s.lq - i0), hk = it.h / group;
    kn.load_rows(row_ptr(p.q, p.dtype, it.b, s.q0 + i0, it.h), p.dtype, p.q.row_stride, rows, D,
                 p.scale, qt, Dp);
    kn.load_rows(row_ptr(g.grad_out, p.dtype, it.b, s.q0 + i0, it.h), p.dtype,
                 g.grad_out.row_stride, rows, D, 1.0f, dot, Dp);
    for (int64_t r = 0; r < rows; ++r) {
      lr[r] = g.lse[lse_index(p, it.b, it.h, s.q0 + i0 + r)];
      dl[r] = g.delta[lse_index(p, it.b, it.h, s.q0 + i0 + r)];
    }
    std::fill(dq, dq + rows * Dp, 0.0f);
    const int64_t kend = visible_keys(p, s, i0 + rows - 1);
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const void* kp = row_ptr(p.k, p.dtype, it.b, s.k0 + j0, hk);
      kn.load_rows_t(kp, p.dtype, p.k.row_stride, nk, D, 1.0f, kt, kBlockK);
      kn.load_rows_t(row_ptr(p.v, p.dtype, it.b, s.k0 + j0, hk), p.dtype, p.v.row_stride, nk, D,
                     1.0f, vt, kBlockK);
      kn.load_rows(kp, p.dtype, p.k.row_stride, nk, D, 1.0f, kr, Dp);
      kn.dot_tile(qt, Dp, rows, D, kt, kBlockK, kBlockK, st, kBlockK);
      kn.dot_tile(dot, Dp, rows, D, vt, kBlockK, kBlockK, dpt, kBlockK);
      const bool hidden = probs_and_dscores(kn, p, s, i0, rows, j0, nk, lr, dl, st, dpt);
      std::fill(dq_part, dq_part + rows * Dp, 0.0f);
      kn.axpy_tile(dpt, kBlockK, 1, rows, nk, kr, Dp, Dp, dq_part, Dp, hidden);  // dS K
      for (int64_t x = 0; x < rows * Dp; ++x) dq[x] += dq_part[x];
    }
    for (int64_t r = 0; r < rows; ++r)
      store_row(dq + r * Dp, D, p.scale, row_ptr(g.grad_q, p.dtype, it.b, s.q0 + i0 + r, it.h),
                p.dtype);
  }
}

}  // namespace cpu
}  // namespace attention
}  // namespace llmcore
