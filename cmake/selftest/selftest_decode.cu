// llmcore_cuda_selftest, decode groups: decode_attention over contiguous, paged (page ids
// out of range) and MXINT8 caches with 1, 4 and the chosen number of key splits, against an
// fp64 host reference by the 2x rule; kv_cache_append into a paged MXINT8 cache, bit-exact.
#include <cstring>
#include <tuple>

#include "bfp/bfp_cpu.h"
#include "decode/decode_cuda.cuh"
#include "selftest.h"

namespace selftest {

using llmcore::DType;
namespace dc = llmcore::decode::cuda;
namespace cpu = llmcore::bfp::cpu;

namespace {

// A KV cache on the host: rows [dim0, dim1, hkv, d] of float values (exactly what the
// device cache holds: fp16 values, or the dequantised MXINT8 blocks) and the device bytes.
struct HostCache {
  int64_t dim0, dim1;
  int hkv, d;
  bool int8;
  std::vector<float> k, v;                  // values
  std::vector<uint16_t> k16, v16;           // fp16 cache
  std::vector<uint8_t> km, vm, ke, ve;      // MXINT8 cache: mantissas, exponents
  int64_t rows() const { return dim0 * dim1 * hkv; }
  int64_t ecols() const { return (d + 31) / 32; }
};

HostCache make_cache(int64_t dim0, int64_t dim1, int hkv, int d, bool int8) {
  HostCache c{dim0, dim1, hkv, d, int8, {}, {}, {}, {}, {}, {}, {}, {}};
  const size_t n = size_t(c.rows()) * d;
  c.k = randn(n);
  c.v = randn(n);
  if (!int8) {
    c.k16 = to_half(c.k);
    c.v16 = to_half(c.v);
    return c;
  }
  for (auto [x, m, e] : {std::tie(c.k, c.km, c.ke), std::tie(c.v, c.vm, c.ve)}) {
    m.resize(n);
    e.resize(size_t(c.rows()) * c.ecols());
    cpu::quantize_rows(x.data(), DType::kFloat32, d, d, 8, 32, false, m.data(), d, e.data(),
                       c.ecols(), 0, c.rows());
    cpu::dequantize_rows(m.data(), d, e.data(), c.ecols(), d, 8, 32, x.data(), DType::kFloat32, d,
                         0, c.rows());
  }
  return c;
}

struct DecodeCase {
  std::string name;
  int batch, q_len, kv_heads, group, d;
  std::vector<int> lens;
  int page;                 // 0: contiguous
  bool int8;
  std::vector<std::pair<int, int>> bad_pages;  // (table slot, page id out of range)
};

void run_decode_case(const DecodeCase& dcase) {
  const int b = dcase.batch, lq = dcase.q_len, hkv = dcase.kv_heads, h = hkv * dcase.group,
            d = dcase.d;
  const int cap = *std::max_element(dcase.lens.begin(), dcase.lens.end()) + 3;
  const int max_pages = dcase.page ? (cap + dcase.page - 1) / dcase.page : 0;
  const int pages = dcase.page ? b * max_pages + 2 : 0;
  const HostCache c = dcase.page ? make_cache(pages, dcase.page, hkv, d, dcase.int8)
                                 : make_cache(b, cap, hkv, d, dcase.int8);
  std::vector<int32_t> table(size_t(b) * max_pages);
  for (int i = 0; i < b * max_pages; ++i) table[i] = (i * 7 + 3) % pages;  // shuffled, distinct
  for (auto [slot, id] : dcase.bad_pages) table[slot] = id;
  std::vector<float> qf = randn(size_t(b) * lq * h * d);
  const auto qh = to_half(qf);

  DevBuf<uint16_t> dq(qh.size()), dout(qh.size());
  DevBuf<float> dlse(size_t(b) * h * lq);
  DevBuf<int32_t> dtable(table.size()), dlens(dcase.lens.size());
  DevBuf<uint16_t> k16(c.k16.size()), v16(c.v16.size());
  DevBuf<uint8_t> km(c.km.size()), vm(c.vm.size()), ke(c.ke.size()), ve(c.ve.size());
  dq.up(qh);
  dtable.up(table);
  dlens.up(dcase.lens);
  dc::DecodeAttentionParams p;
  const int64_t rs = int64_t(hkv) * d;  // elements (bytes for int8) per cache row
  if (c.int8) {
    km.up(c.km);
    vm.up(c.vm);
    ke.up(c.ke);
    ve.up(c.ve);
    p.int8_cache = true;
    p.k_cache = km.p;
    p.v_cache = vm.p;
    p.k_exponent = ke.p;
    p.v_exponent = ve.p;
    const int64_t er = int64_t(hkv) * c.ecols();
    p.ke_strides = p.ve_strides = {c.dim1 * er, er, c.ecols()};
  } else {
    k16.up(c.k16);
    v16.up(c.v16);
    p.k_cache = k16.p;
    p.v_cache = v16.p;
  }
  p.k_strides = p.v_strides = {c.dim1 * rs, rs, d};
  p.q = dq.p;
  p.geo.dim0 = c.dim0;
  p.geo.dim1 = c.dim1;
  if (dcase.page) {
    p.geo.block_table = dtable.p;
    p.geo.bt_stride = max_pages;
    p.geo.max_pages = max_pages;
  }
  p.cache_seqlens = dlens.p;
  p.batch = b;
  p.q_len = lq;
  p.heads = h;
  p.kv_heads = hkv;
  p.head_dim = d;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(double(d)));
  p.dtype = DType::kFloat16;
  p.out = dout.p;
  p.lse = dlse.p;

  // fp64 reference and its fp16 emulation: keys j <= len - lq + t that exist (in range of
  // the capacity, in a page with a valid id).
  std::vector<double> ref(qh.size(), 0.0), lowp(qh.size(), 0.0);
  std::vector<double> ref_lse(size_t(b) * h * lq, -INFINITY), lowp_lse(ref_lse);
  for (int bb = 0; bb < b; ++bb)
    for (int t = 0; t < lq; ++t)
      for (int hh = 0; hh < h; ++hh) {
        const int hk = hh / dcase.group;
        const float* qv = qf.data() + ((size_t(bb) * lq + t) * h + hh) * d;
        std::vector<int64_t> rows;
        for (int j = 0; j <= dcase.lens[bb] - lq + t; ++j) {
          int64_t i0 = bb, i1 = j;
          if (dcase.page) {
            i0 = table[size_t(bb) * max_pages + j / dcase.page];
            i1 = j % dcase.page;
            if (i0 < 0 || i0 >= pages) continue;
          }
          rows.push_back(((i0 * c.dim1 + i1) * hkv + hk) * d);
        }
        if (rows.empty()) continue;
        const size_t o = ((size_t(bb) * lq + t) * h + hh) * d, l = (size_t(bb) * h + hh) * lq + t;
        for (bool lp : {false, true}) {
          auto R = [&](double x) { return lp ? double(r16(x)) : x; };
          std::vector<double> sc(rows.size());
          double mx = -INFINITY, sum = 0;
          for (size_t j = 0; j < rows.size(); ++j) {
            double acc = 0;
            for (int cc = 0; cc < d; ++cc) acc += double(qv[cc]) * c.k[rows[j] + cc];
            sc[j] = R(R(acc) * p.softmax_scale);
            mx = std::max(mx, sc[j]);
          }
          for (double s : sc) sum += std::exp(s - mx);
          const double lse = R(mx + std::log(sum));
          double* out = (lp ? lowp : ref).data() + o;
          for (size_t j = 0; j < rows.size(); ++j) {
            const double w = R(std::exp(R(sc[j] - lse)));
            for (int cc = 0; cc < d; ++cc) out[cc] += w * c.v[rows[j] + cc];
          }
          if (lp)
            for (int cc = 0; cc < d; ++cc) out[cc] = R(out[cc]);
          (lp ? lowp_lse : ref_lse)[l] = lse;
        }
      }

  int dev = 0;
  CU(cudaGetDevice(&dev));
  const int chosen = dc::decode_attention_num_splits(p, dev);
  for (int splits : {1, 4, chosen}) {
    p.num_splits = splits;
    const int64_t ws = dc::decode_attention_workspace_floats(p, splits);
    DevBuf<float> work(ws > 0 ? ws : 1);
    p.partial_out = ws > 0 ? work.p : nullptr;
    p.partial_lse = ws > 0 ? work.p + int64_t(b) * h * lq * splits * d : nullptr;
    dout.poison();
    CU(dc::decode_attention(p, nullptr));
    CU(cudaDeviceSynchronize());
    const auto out = dout.down();
    const auto lse = dlse.down();
    Rule2x ro, rl;
    for (size_t i = 0; i < out.size(); ++i) ro.add(llmcore::f16_to_f32(out[i]), ref[i], lowp[i]);
    for (size_t i = 0; i < lse.size(); ++i) rl.add(lse[i], ref_lse[i], lowp_lse[i]);
    const std::string name = "decode " + dcase.name + ", splits " + std::to_string(splits) +
                             (splits == chosen ? " (chosen)" : "");
    check_2x(name + " out", ro, false);
    check_2x(name + " lse", rl, false);  // the Python tests' floor: q's dtype
  }
}

// Time decode over a large cache (values from one random chunk repeated: not zeros).
void time_decode(bool int8) {
  const int b = g_opt.reduced ? 2 : 16, ctx = g_opt.reduced ? 1024 : 8192, hkv = 4, h = 32, d = 128;
  const int64_t elems = int64_t(b) * ctx * hkv * d;
  const size_t elem_bytes = int8 ? 1 : 2;
  const int64_t ecols = d / 32;
  DevBuf<uint8_t> k(elems * elem_bytes), v(elems * elem_bytes);
  DevBuf<uint8_t> ke(int8 ? elems / 32 : 0), ve(int8 ? elems / 32 : 0);
  {  // fill with a repeated random chunk: fp16 values, or int8 mantissas and exponents 120..127
    std::vector<float> f = randn(1 << 20);
    std::vector<uint16_t> chunk16 = to_half(f);
    std::vector<uint8_t> chunk(chunk16.size() * 2), exps(chunk.size());
    std::memcpy(chunk.data(), chunk16.data(), chunk.size());
    for (size_t i = 0; i < exps.size(); ++i) exps[i] = static_cast<uint8_t>(120 + chunk[i] % 8);
    for (DevBuf<uint8_t>* buf : {&k, &v, &ke, &ve}) {
      const std::vector<uint8_t>& src = (buf == &ke || buf == &ve) ? exps : chunk;
      for (size_t off = 0; off < buf->n; off += src.size())
        CU(cudaMemcpy(buf->p + off, src.data(), std::min(src.size(), buf->n - off),
                      cudaMemcpyHostToDevice));
    }
  }
  std::vector<float> qf = randn(size_t(b) * h * d);
  DevBuf<uint16_t> q(qf.size()), out(qf.size());
  q.up(to_half(qf));
  DevBuf<float> lse(size_t(b) * h);
  DevBuf<int32_t> lens(b);
  lens.up(std::vector<int32_t>(b, ctx));
  dc::DecodeAttentionParams p;
  p.q = q.p;
  p.k_cache = k.p;
  p.v_cache = v.p;
  p.k_strides = p.v_strides = {int64_t(ctx) * hkv * d, int64_t(hkv) * d, d};
  if (int8) {
    p.int8_cache = true;
    p.k_exponent = ke.p;
    p.v_exponent = ve.p;
    p.ke_strides = p.ve_strides = {int64_t(ctx) * hkv * ecols, int64_t(hkv) * ecols, ecols};
  }
  p.geo.dim0 = b;
  p.geo.dim1 = ctx;
  p.cache_seqlens = lens.p;
  p.batch = b;
  p.q_len = 1;
  p.heads = h;
  p.kv_heads = hkv;
  p.head_dim = d;
  p.softmax_scale = 0.088f;
  p.out = out.p;
  p.lse = lse.p;
  int dev = 0;
  CU(cudaGetDevice(&dev));
  p.num_splits = dc::decode_attention_num_splits(p, dev);
  const int64_t ws = dc::decode_attention_workspace_floats(p, p.num_splits);
  DevBuf<float> work(ws > 0 ? ws : 1);
  p.partial_out = ws > 0 ? work.p : nullptr;
  p.partial_lse = ws > 0 ? work.p + int64_t(b) * h * p.num_splits * d : nullptr;
  const double ms = time_ms([&](int) { CU(dc::decode_attention(p, nullptr)); }, 3,
                            g_opt.reduced ? 3 : 30);
  const double bytes = double(k.n + v.n + ke.n + ve.n);
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  timing("decode " + std::string(int8 ? "mxint8" : "fp16") + " b" + std::to_string(b) + " ctx" +
             std::to_string(ctx) + " h32:4 d128 splits " + std::to_string(p.num_splits),
         ms, gbps, "GB/s", g_copy_gbps > 0 ? gbps / g_copy_gbps : -1, "the copy");
}

}  // namespace

void test_decode() {
  const int page_slots = g_opt.reduced ? 8 : 64;
  const std::vector<DecodeCase> cases = {
      // a sequence shorter than q_len: its first queries see no key
      {"contiguous fp16 gqa 4 q_len 4 d128", 3, 4, 2, 4, 128, {2, 300, g_opt.reduced ? 500 : 1500}, 0,
       false, {}},
      {"contiguous fp16 gqa 8 q_len 1 d64", 2, 1, 1, 8, 64, {1, 777}, 0, false, {}},
      {"paged fp16 gqa 4 q_len 4 d128, page ids past the end and -1", 2, 4, 2, 4, 128,
       {page_slots * 16 - 8, page_slots * 8 + 3}, 16, false, {{1, 100000}, {page_slots + 1, -1}}},
      {"paged mxint8 gqa 4 q_len 2 d128, a page id -1", 2, 2, 2, 4, 128, {page_slots * 16 - 8, 700}, 16,
       true, {{2, -1}}},
      {"contiguous mxint8 gqa 8 q_len 1 d256", 2, 1, 1, 8, 256, {5, 400}, 0, true, {}},
  };
  for (const DecodeCase& c : cases) run_decode_case(c);
  if (!g_opt.time) return;
  time_decode(false);
  time_decode(true);
}

// ---- kv_cache_append: fp16 rows into a paged MXINT8 cache, bit-exact ---------------------------
void test_kv_cache_append() {
  const int b = 3, t = 5, hkv = 2, d = 128, page = 16, max_pages = 4, pages = b * max_pages;
  const int64_t ecols = d / 32, rs = int64_t(hkv) * d, er = int64_t(hkv) * ecols;
  std::vector<int32_t> table(size_t(b) * max_pages);
  for (int i = 0; i < b * max_pages; ++i) table[i] = (i * 5 + 1) % pages;
  table[max_pages + 1] = pages + 7;  // sequence 1, positions 16..31: skipped
  const std::vector<int32_t> start = {0, 14, 60};  // 60 + 4 > capacity 64: the last row skipped
  std::vector<float> kf = randn(size_t(b) * t * hkv * d, 3.0f), vf = randn(kf.size(), 0.01f);
  const auto kh = to_half(kf), vh = to_half(vf);
  DevBuf<uint16_t> dk(kh.size()), dv(vh.size());
  DevBuf<uint8_t> km(size_t(pages) * page * rs), vm(km.n), ke(size_t(pages) * page * er), ve(ke.n);
  DevBuf<int32_t> dtable(table.size()), dstart(start.size());
  dk.up(kh);
  dv.up(vh);
  dtable.up(table);
  dstart.up(start);
  for (DevBuf<uint8_t>* buf : {&km, &vm, &ke, &ve}) buf->poison(0xa5);
  dc::KvCacheAppendParams p;
  p.k = dk.p;
  p.v = dv.p;
  p.dtype = DType::kFloat16;
  p.k_cache = km.p;
  p.v_cache = vm.p;
  p.k_strides = p.v_strides = {page * rs, rs, d};
  p.int8_cache = true;
  p.k_exponent = ke.p;
  p.v_exponent = ve.p;
  p.ke_strides = p.ve_strides = {page * er, er, ecols};
  p.geo.dim0 = pages;
  p.geo.dim1 = page;
  p.geo.block_table = dtable.p;
  p.geo.bt_stride = max_pages;
  p.geo.max_pages = max_pages;
  p.start_pos = dstart.p;
  p.batch = b;
  p.new_tokens = t;
  p.kv_heads = hkv;
  p.head_dim = d;
  CU(dc::kv_cache_append(p, nullptr));
  CU(cudaDeviceSynchronize());
  // Expected: the poisoned cache with each appended row quantised by the CPU kernel.
  std::vector<uint8_t> ekm(km.n, 0xa5), evm(vm.n, 0xa5), eke(ke.n, 0xa5), eve(ve.n, 0xa5);
  int64_t written = 0;
  for (int bb = 0; bb < b; ++bb)
    for (int tt = 0; tt < t; ++tt) {
      const int64_t pos = start[bb] + tt;
      if (pos >= int64_t(max_pages) * page) continue;
      const int32_t pid = table[size_t(bb) * max_pages + pos / page];
      if (pid < 0 || pid >= pages) continue;
      const int64_t row = (int64_t(pid) * page + pos % page) * hkv;  // first head's row
      const size_t src = (size_t(bb) * t + tt) * hkv * d;
      cpu::quantize_rows(kh.data() + src, DType::kFloat16, d, d, 8, 32, false, ekm.data() + row * d, d,
                         eke.data() + row * ecols, ecols, 0, hkv);
      cpu::quantize_rows(vh.data() + src, DType::kFloat16, d, d, 8, 32, false, evm.data() + row * d, d,
                         eve.data() + row * ecols, ecols, 0, hkv);
      ++written;
    }
  int64_t bad = 0;
  const std::vector<uint8_t>* expect[] = {&ekm, &evm, &eke, &eve};
  const DevBuf<uint8_t>* got[] = {&km, &vm, &ke, &ve};
  for (int i = 0; i < 4; ++i) {
    const auto g = got[i]->down();
    for (size_t j = 0; j < g.size(); ++j) bad += g[j] != (*expect[i])[j];
  }
  check("kv_cache_append fp16 -> paged mxint8, a page id out of range, a row past capacity",
        bad == 0, std::to_string(bad) + " cache bytes differ (" + std::to_string(written) +
                      " rows written, the rest must stay untouched)");
}

}  // namespace selftest
