// Torch binding of the CPU decode kernels (decode_cpu.h): checks, layout, threads. All the
// arithmetic is in the framework-free kernels; threads come from the per-token ops' helper
// pool (common/parallel.h: torch.get_num_threads() threads, no OpenMP region whose
// spinning workers would take a core from the next GEMV), so torch.set_num_threads is
// respected.
//
// decode_attention trusts cache_seqlens / block_table values only as far as the kernel's
// own clamping goes (lengths clamped to the capacity, out-of-range pages read as empty):
// checking them here would cost nothing on the CPU but the Python face already does it
// when asked (validate=True), and KVCache knows its lengths. kv_cache_append always checks
// its positions and pages here, since a bad write would corrupt other sequences' data.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/check.h"
#include "common/parallel.h"
#include "decode/decode_cpu.h"

namespace llmcore {
namespace {

namespace cpu = decode::cpu;

// Cache rows per parallel task of kv_cache_append, in elements written.
constexpr int64_t kAppendGrainElems = int64_t{1} << 14;

// The cache pair (k_cache, v_cache, optional exponents) against the new tokens `x`
// ([B, *, heads, D]: q or k) and the block table.
void check_cache(const at::Tensor& x, const char* x_name, const at::Tensor& kc,
                 const at::Tensor& vc, const std::optional<at::Tensor>& ke,
                 const std::optional<at::Tensor>& ve, const std::optional<at::Tensor>& bt) {
  const at::Device cpu_dev(at::kCPU);
  CHECK_DEVICE(kc, cpu_dev);
  CHECK_DEVICE(vc, cpu_dev);
  CHECK_DIM(kc, 4);
  LLMCORE_CHECK(vc.sizes() == kc.sizes() && vc.scalar_type() == kc.scalar_type(),
                "k_cache and v_cache must have the same shape and dtype, got ",
                dtype_name(kc.scalar_type()), " ", shape_str(kc.sizes()), " and ",
                dtype_name(vc.scalar_type()), " ", shape_str(vc.sizes()));
  CHECK_LASTDIM_CONTIGUOUS(kc);
  CHECK_LASTDIM_CONTIGUOUS(vc);
  const int64_t B = x.size(0), D = x.size(3);
  LLMCORE_CHECK(D >= 1, x_name, " must have head_dim >= 1, got shape ", shape_str(x.sizes()));
  LLMCORE_CHECK(kc.size(3) == D, "k_cache.size(3) (head_dim) must be ", D, " (", x_name,
                ".size(3)), got shape ", shape_str(kc.sizes()));
  LLMCORE_CHECK(kc.size(2) >= 1, "k_cache must have >= 1 kv heads, got shape ",
                shape_str(kc.sizes()));
  LLMCORE_CHECK(ke.has_value() == ve.has_value(),
                "k_exponent and v_exponent must both be given (MXINT8 cache) or both omitted");
  if (ke.has_value()) {
    LLMCORE_CHECK(kc.scalar_type() == at::kChar,
                  "an MXINT8 cache (k_exponent given) must have int8 mantissas, got k_cache of ",
                  dtype_name(kc.scalar_type()));
    const std::vector<int64_t> want = {kc.size(0), kc.size(1), kc.size(2),
                                       (D + cpu::kMxBlock - 1) / cpu::kMxBlock};
    for (const auto* e : {&*ke, &*ve}) {
      const char* name = e == &*ke ? "k_exponent" : "v_exponent";
      LLMCORE_CHECK(e->device() == cpu_dev, name, " must be on cpu, got ", e->device());
      LLMCORE_CHECK(e->scalar_type() == at::kByte, name, " must have dtype uint8, got ",
                    dtype_name(e->scalar_type()));
      LLMCORE_CHECK(e->sizes() == at::IntArrayRef(want), name, " must have shape ",
                    shape_str(want), " (the cache's leading dims, ceil(head_dim / 32)), got ",
                    shape_str(e->sizes()));
      LLMCORE_CHECK(e->stride(3) == 1 || e->size(3) == 1, name,
                    " must be contiguous in its last dim, got strides ", shape_str(e->strides()));
    }
  } else {  // a float cache of any float dtype: values convert on the way in and out
    const at::ScalarType ct = kc.scalar_type();
    LLMCORE_CHECK(ct == at::kFloat || ct == at::kBFloat16 || ct == at::kHalf,
                  "k_cache must be float32, bfloat16 or float16 (any of them, whatever ", x_name,
                  "'s dtype) or an MXINT8 cache (int8 with exponents), got ", dtype_name(ct));
  }
  if (bt.has_value()) {
    const at::Tensor& block_table = *bt;
    CHECK_DEVICE(block_table, cpu_dev);
    CHECK_DTYPE(block_table, at::kInt);
    CHECK_DIM(block_table, 2);
    LLMCORE_CHECK(block_table.size(0) == B, "block_table.size(0) must be ", B,
                  " (batch), got shape ", shape_str(block_table.sizes()));
  } else {
    LLMCORE_CHECK(kc.size(0) == B, "a contiguous k_cache must have batch ", B,
                  " in dim 0, got shape ", shape_str(kc.sizes()),
                  " (pass block_table for a paged cache)");
  }
}

cpu::CacheLayout layout_of(const at::Tensor& c, const at::Tensor* e, const at::Tensor* bt) {
  cpu::CacheLayout l;
  l.dim0 = c.size(0);
  l.rows = c.size(1);
  l.hkv = c.size(2);
  l.d = c.size(3);
  l.stride0 = c.stride(0);
  l.stride1 = c.stride(1);
  l.stride2 = c.stride(2);
  l.exp_stride0 = e ? e->stride(0) : 0;
  l.exp_stride1 = e ? e->stride(1) : 0;
  l.exp_stride2 = e ? e->stride(2) : 0;
  l.block_table = bt ? bt->data_ptr<int32_t>() : nullptr;
  l.max_pages = bt ? bt->size(1) : 0;
  l.bt_stride = bt ? bt->size(1) : 0;
  return l;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, double softmax_scale,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_exponent,
    const std::optional<at::Tensor>& v_exponent) {
  const at::Device cpu_dev(at::kCPU);
  CHECK_DEVICE(q, cpu_dev);
  CHECK_FLOAT_INPUT(q);
  CHECK_DIM(q, 4);
  check_cache(q, "q", k_cache, v_cache, k_exponent, v_exponent, block_table);
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t hkv = k_cache.size(2);
  LLMCORE_CHECK(H % hkv == 0, "q's heads (", H, ") must be a multiple of the cache's kv_heads (",
                hkv, "), got q ", shape_str(q.sizes()), " and k_cache ",
                shape_str(k_cache.sizes()));
  CHECK_DEVICE(cache_seqlens, cpu_dev);
  CHECK_DTYPE(cache_seqlens, at::kInt);
  CHECK_DIM(cache_seqlens, 1);
  CHECK_SIZE(cache_seqlens, 0, B);

  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  // One layout describes K and V (and their exponents): if they differ, copy both.
  at::Tensor kc = k_cache, vc = v_cache;
  std::optional<at::Tensor> ke = k_exponent, ve = v_exponent;
  if (kc.strides() != vc.strides()) {
    kc = kc.contiguous();
    vc = vc.contiguous();
  }
  if (ke.has_value() && ke->strides() != ve->strides()) {
    ke = ke->contiguous();
    ve = ve->contiguous();
  }
  const at::Tensor qc = q.contiguous();
  const at::Tensor lens = cache_seqlens.contiguous();
  std::optional<at::Tensor> bt;
  if (block_table.has_value()) bt = block_table->contiguous();

  cpu::DecodeArgs a;
  a.q = qc.data_ptr();
  a.q_type = to_dtype(q.scalar_type());
  a.batch = B;
  a.q_len = Lq;
  a.heads = H;
  a.head_dim = D;
  a.k = kc.data_ptr();
  a.v = vc.data_ptr();
  a.k_exp = ke.has_value() ? ke->data_ptr<uint8_t>() : nullptr;
  a.v_exp = ve.has_value() ? ve->data_ptr<uint8_t>() : nullptr;
  a.cache_type = to_dtype(kc.scalar_type());
  a.layout = layout_of(kc, ke.has_value() ? &*ke : nullptr, bt.has_value() ? &*bt : nullptr);
  a.seqlens = lens.data_ptr<int32_t>();
  a.scale = static_cast<float>(softmax_scale);

  const cpu::DecodePlan plan = cpu::decode_plan(a, at::get_num_threads());
  at::Tensor ws = at::empty({static_cast<int64_t>(cpu::decode_workspace_floats(a, plan))},
                            q.options().dtype(at::kFloat));
  float* wsp = ws.data_ptr<float>();
  // Tasks handed out one at a time (common/parallel.h): a thread without a core delays one
  // task, not a static share of them.
  parallel_chunks(plan.tasks, 1, [&](int64_t t0, int64_t t1) {
    cpu::decode_attention_tasks(a, plan, wsp, t0, t1);
  });
  void* outp = out.data_ptr();
  float* lsep = lse.data_ptr<float>();
  const int64_t merge_grain =
      std::max<int64_t>(1, 4096 / std::max<int64_t>(1, plan.rows * D * plan.splits));
  parallel_chunks(plan.groups, merge_grain, [&](int64_t g0, int64_t g1) {
    cpu::decode_attention_merge(a, plan, wsp, outp, lsep, g0, g1);
  });
  return {out, lse};
}

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& start_pos,
                         const std::optional<at::Tensor>& block_table,
                         const std::optional<at::Tensor>& k_exponent,
                         const std::optional<at::Tensor>& v_exponent) {
  const at::Device cpu_dev(at::kCPU);
  CHECK_DEVICE(k, cpu_dev);
  CHECK_DEVICE(v, cpu_dev);
  CHECK_FLOAT_INPUT(k);
  CHECK_DIM(k, 4);
  LLMCORE_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
                "k and v must have the same shape and dtype, got ", dtype_name(k.scalar_type()),
                " ", shape_str(k.sizes()), " and ", dtype_name(v.scalar_type()), " ",
                shape_str(v.sizes()));
  check_cache(k, "k", k_cache, v_cache, k_exponent, v_exponent, block_table);
  const int64_t B = k.size(0), T = k.size(1), hkv = k.size(2);
  LLMCORE_CHECK(k_cache.size(2) == hkv, "k_cache.size(2) (kv_heads) must be ", hkv,
                " (k.size(2)), got shape ", shape_str(k_cache.sizes()));
  CHECK_DEVICE(start_pos, cpu_dev);
  CHECK_DTYPE(start_pos, at::kInt);
  CHECK_DIM(start_pos, 1);
  CHECK_SIZE(start_pos, 0, B);
  if (B == 0 || T == 0) return;

  const at::Tensor sp = start_pos.contiguous();
  std::optional<at::Tensor> bt;
  if (block_table.has_value()) bt = block_table->contiguous();
  const int64_t page = k_cache.size(1), P = k_cache.size(0);
  const int64_t cap = bt.has_value() ? bt->size(1) * page : page;
  const int32_t* spp = sp.data_ptr<int32_t>();
  // Writes must stay inside each sequence's own slots: check every position and page.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = spp[b];
    LLMCORE_CHECK(s >= 0 && s + T <= cap, "start_pos[", b, "] + ", T,
                  " new tokens must lie in [0, ", cap, "] (the cache capacity), got start_pos[",
                  b, "] = ", s);
    if (!bt.has_value()) continue;
    const int32_t* row = bt->data_ptr<int32_t>() + b * bt->size(1);
    for (int64_t pg = s / page; pg <= (s + T - 1) / page; ++pg)
      LLMCORE_CHECK(row[pg] >= 0 && row[pg] < P, "block_table[", b, "][", pg, "] = ", row[pg],
                    " is not a page of the cache (which has ", P, " pages); positions ", s,
                    "..", s + T - 1, " of sequence ", b, " are written");
  }
  const at::Tensor kx = k.contiguous(), vx = v.contiguous();
  const at::Tensor* bp = bt.has_value() ? &*bt : nullptr;
  const int64_t grain = std::max<int64_t>(1, kAppendGrainElems / (hkv * k.size(3)));
  for (int which = 0; which < 2; ++which) {
    const at::Tensor& cache = which == 0 ? k_cache : v_cache;
    const std::optional<at::Tensor>& e = which == 0 ? k_exponent : v_exponent;
    cpu::AppendArgs a;
    a.cache = cache.data_ptr();
    a.exp = e.has_value() ? e->data_ptr<uint8_t>() : nullptr;
    a.cache_type = to_dtype(cache.scalar_type());
    a.layout = layout_of(cache, e.has_value() ? &*e : nullptr, bp);
    a.src = (which == 0 ? kx : vx).data_ptr();
    a.src_type = to_dtype(k.scalar_type());
    a.batch = B;
    a.new_tokens = T;
    a.start_pos = spp;
    parallel_chunks(B * T, grain, [&](int64_t r0, int64_t r1) {
      cpu::kv_cache_append_rows(a, r0, r1);
    });
  }
}

}  // namespace
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("decode_attention", &llmcore::decode_attention_cpu);
  m.impl("kv_cache_append", &llmcore::kv_cache_append_cpu);
}
