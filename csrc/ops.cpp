// Every llmcore op schema, in one place (but decoder_layers: see the end, and the two
// host-memory utilities described at the end, defined with their code in
// csrc/common/hugepages_binding.cpp). Devices register kernels with
// TORCH_LIBRARY_IMPL(llmcore, CPU|CUDA, m) in their own binding files; the Python face of
// each op (llmcore/ops/*.py) adds the docstring, the fake (meta) impl and autograd.
//
// BFP tensors cross this boundary as two tensors: `mantissa` (int8 [..., K], or for
// formats of <= 4 mantissa bits uint8 [..., ceil(K/2)] with element 2i in the low nibble
// and 2i+1 in the high nibble, two's complement) and `exponent` (uint8 [..., ceil(K/B)],
// E8M0: biased by 127, 255 = NaN block). See docs/formats.md and llmcore/formats.py.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing llmcore._C runs the static TORCH_LIBRARY registrations below; the module
// itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(llmcore, m) {
  // ---- block floating point (csrc/bfp) -------------------------------------------------
  // x [..., K] float32/bfloat16/float16 -> (mantissa, exponent) as described above.
  m.def("bfp_quantize(Tensor x, int mantissa_bits, int block_size, bool round_even)"
        " -> (Tensor mantissa, Tensor exponent)");
  // -> [..., k] of `dtype` (float32/bfloat16/float16).
  m.def("bfp_dequantize(Tensor mantissa, Tensor exponent, int mantissa_bits, int block_size,"
        " int k, ScalarType dtype) -> Tensor");
  // Weight-only: y[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias[N]); x float32/bf16/fp16,
  // fp32 accumulation, y in x's dtype.
  m.def("bfp_linear(Tensor x, Tensor w_mantissa, Tensor w_exponent, int mantissa_bits,"
        " int block_size, Tensor? bias) -> Tensor");
  // Both operands quantised with the same block size: per K block the integer mantissa
  // dot product is exact in int32, scaled by 2^(ea + eb - (a_bits-2) - (b_bits-2)) and
  // accumulated in fp32. a [M, K], b [N, K] -> [M, N] of out_dtype (+ bias[N], added in
  // fp32).
  m.def("bfp_gemm(Tensor a_mantissa, Tensor a_exponent, Tensor b_mantissa, Tensor b_exponent,"
        " int a_bits, int b_bits, int block_size, int k, Tensor? bias, ScalarType out_dtype)"
        " -> Tensor");
  // bfp_quantize of x [..., K] (a_bits, block_size, round_even) then bfp_gemm with the
  // weight [N, K] -> [..., N] in x's dtype (+ bias[N], added in fp32): one call, x quantised
  // in scratch (decode: no allocation but the output).
  m.def("bfp_act_linear(Tensor x, Tensor w_mantissa, Tensor w_exponent, int a_bits,"
        " int w_bits, int block_size, bool round_even, Tensor? bias) -> Tensor");
  // bfp_act_linear of one x with several weights of one format (q/k/v, gate/up): x is
  // quantised once -> one [..., N_i] per weight.
  m.def("bfp_act_linear_multi(Tensor x, Tensor[] w_mantissa, Tensor[] w_exponent, int a_bits,"
        " int w_bits, int block_size, bool round_even, Tensor?[] bias) -> Tensor[]");
  // The GEMV tile layout of a weight (csrc/bfp/bfp_cpu.h, docs/bfp.md), CPU: mantissa
  // [N, K or K/2] and exponent [N, K/32] (block 32, N % 16 == 0, K % 32 == 0) <-> tiles
  // [N/16, K/32, 16 * block bytes] and [N/16, K/32, 16]: the same bytes, reordered.
  // bfp_act_linear(_multi) take weights in either layout (one layout per call).
  m.def("bfp_tiles_pack(Tensor mantissa, Tensor exponent, int mantissa_bits, int block_size)"
        " -> (Tensor tiles, Tensor tile_exponent)");
  m.def("bfp_tiles_unpack(Tensor tiles, Tensor tile_exponent, int mantissa_bits,"
        " int block_size) -> (Tensor mantissa, Tensor exponent)");
  // Embedding lookup, CPU: rows ids (int64/int32, any shape, each in [0, N): else
  // IndexError) of a BFP table [N, k] in either layout (mantissa 2-D plain, 3-D tiles),
  // dequantised -> [*ids.shape, k] of dtype; the same values as bfp_dequantize of the rows.
  m.def("bfp_embedding(Tensor mantissa, Tensor exponent, Tensor ids, int mantissa_bits,"
        " int block_size, int k, ScalarType dtype) -> Tensor");

  // ---- dense decode GEMV (csrc/dense) -------------------------------------------------------
  // y = x @ weight^T (+ bias) for x [..., K] of M = prod(leading dims) <= 16 rows, weight
  // [N, K] (contiguous rows, any row stride) and bias [N] of x's dtype (float32/bf16/fp16):
  // fp32 sums, bias added in fp32, one rounding to x's dtype -> [..., N]. Each weight row is
  // streamed once for all M rows (decode, draft verification); more rows: F.linear.
  m.def("linear_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");

  // ---- fused attention (csrc/attention) --------------------------------------------------
  // q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (H % Hkv == 0: GQA/MQA), last dim contiguous.
  // causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned). Returns out
  // [B, Sq, H, D] in q's dtype and lse [B, H, Sq] fp32 (natural log; -inf for a row that
  // sees no key, whose out row is 0). The Sq x Sk matrix is never materialised.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale)"
        " -> (Tensor out, Tensor lse)");
  // Gradients of attention_fwd given grad_out [B, Sq, H, D] and the saved out/lse; P is
  // recomputed tile by tile. deterministic=True forbids atomics/order-dependent sums.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " bool causal, float softmax_scale, bool deterministic)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Packed batches: q [Tq, H, D], k/v [Tk, Hkv, D]; sequence b is rows
  // cu_seqlens[b] .. cu_seqlens[b+1] (int32 [batch+1], starting at 0). lse [H, Tq] fp32.
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,"
        " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal,"
        " float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def("attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, bool causal, float softmax_scale, bool deterministic)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ---- fused decoder-step ops (csrc/fused) ------------------------------------------------
  // One dtype for every float input; results as the unfused torch chain rounds them.
  // weight[N] * (x[..., N] * rsqrt(mean(x^2) + eps)) (the normed x rounded to x's dtype).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // sum = x + delta (x's dtype), out = rms_norm(sum, weight, eps): a residual add and the
  // next norm in one pass.
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps)"
        " -> (Tensor sum, Tensor out)");
  // In place, q [B, T, H, D] and k [B, T, Hk, D] (last dim contiguous, D even):
  // x * cos + rotate_half(x) * sin with cos/sin [B, T, D].
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  // silu(gate) * up, same shape and dtype.
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // Greedy decoding's pick: int64 [...] = the index of the largest of x[..., V] along its
  // last axis (V >= 1), the first one on ties and the first NaN if there is one, as
  // torch.argmax(x, -1); float32/bf16/fp16, any strides.
  m.def("argmax_last(Tensor x) -> Tensor");

  // ---- KV-cached decoding (csrc/decode) ----------------------------------------------------
  // q [B, Lq, H, D] (Lq new tokens per sequence, 1..16), cache_seqlens int32 [B] = valid
  // length per sequence INCLUDING the new tokens, which are its last Lq positions: query t
  // sees keys j <= cache_seqlens[b] - Lq + t (causal among the new tokens). Cache layout:
  // contiguous [B, S_max, Hkv, D], or paged [num_pages, page_size, Hkv, D] with block_table
  // int32 [B, max_pages] (position j of sequence b is page block_table[b][j / page_size],
  // row j % page_size). Cache dtype = q's, or int8 MXINT8 mantissas with k/v_exponent
  // uint8 [..., Hkv, ceil(D/32)] (E8M0, blocks of 32 along D). -> out [B, Lq, H, D] q's
  // dtype, lse [B, H, Lq] fp32 (-inf and out = 0 for a query that sees no key).
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,"
        " float softmax_scale, Tensor? block_table, Tensor? k_exponent, Tensor? v_exponent)"
        " -> (Tensor out, Tensor lse)");
  // Writes k/v [B, T, Hkv, D] at positions start_pos[b] + t (int32 [B]) of each sequence,
  // in place; for an int8 cache it quantises each 32-element block of D to MXINT8
  // (round half away from zero) into the mantissa cache and the exponent tensors.
  m.def("kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v,"
        " Tensor start_pos, Tensor? block_table, Tensor(c!)? k_exponent,"
        " Tensor(d!)? v_exponent) -> ()");

  // ---- a decoder's blocks in one call (csrc/fused/decoder_layers_binding.cpp) --------------------
  // Every block of a Llama-family decoder (pre-norm attention with RoPE over the KV cache,
  // SwiGLU MLP) for T new tokens per sequence, as a chain of the ops above: x [B, T, dim]
  // (the embedded tokens) -> the final norm of the residual stream [B, T, dim]. The model's
  // side is a DecoderWeights object, built once (fused/decoder_layers.h):
  // DecoderWeights(norm_weight, eps, linear, linear_spec, n_heads, n_kv_heads) with
  // norm_weight [input_norm_0, post_attention_norm_0, ..., final_norm] (one eps for all)
  // and, per layer, seven linears in the order q, k, v, o, gate, up, down, each giving 3
  // entries of `linear` (weight or w_mantissa, w_exponent or None, bias or None) and 4 of
  // linear_spec: kind (0 dense weight [N, K]: linear_gemv up to 16 rows, else at::linear;
  // 1 BFP weight-only: bfp_linear; 2 BFP with int8 activations: bfp_act_linear_multi, one
  // call for q/k/v and one for gate/up when they share a format), a_bits, w_bits,
  // block_size. cos/sin [B, T, head_dim] in x's dtype. The cache is all layers' storage
  // [L, ...] as kv_cache_append takes it per layer (plus the exponents of an MXINT8 cache);
  // cache_seqlens int32 [B] = lengths before this step: the new k/v are written at
  // cache_seqlens + t and attended with decode_attention (cache_seqlens + T keys). Bit for
  // bit the chain of those ops.
  //
  //   decoder_layers(Tensor x, Tensor cos, Tensor sin,
  //                  __torch__.torch.classes.llmcore.DecoderWeights weights,
  //                  Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? k_exponent,
  //                  Tensor(d!)? v_exponent, Tensor cache_seqlens, Tensor? block_table,
  //                  float softmax_scale) -> Tensor
  //
  // and greedy_decode (below) are the schemas defined elsewhere: with their class, in
  // csrc/fused/decoder_layers_binding.cpp, since a schema that names a class can be parsed only
  // once the class is registered, and only within one file is that order guaranteed.
  //
  // ---- greedy decoding of a whole model, N steps in one call (same file) -----------------------
  //   greedy_decode(Tensor tokens, int steps, DecoderWeights weights, Tensor embed_weight,
  //                 Tensor? embed_exponent, int embed_bits, int embed_block, Tensor?[] head,
  //                 int[] head_spec, Tensor rope_cos, Tensor rope_sin, <the cache arguments of
  //                 decoder_layers>, int[] eos, int fill, Tensor done) -> Tensor
  // tokens int64 [B]: each sequence's last token, not yet in the cache, or [B, P]: its last
  // P tokens, all appended by the first step (one decoder_layers call of P positions; the
  // pick follows the last). Each of up to `steps`
  // steps embeds the current tokens (embed_weight [vocab, dim] of the model's dtype, or a BFP
  // table as bfp_embedding takes it when embed_exponent is given), takes cos/sin as the rows
  // of the float32 tables rope_cos/rope_sin [positions, head_dim] at each sequence's
  // position rounded to the model's dtype, runs decoder_layers over the cache, the head (one
  // linear: 3 entries + 4 ints as in DecoderWeights) and argmax_last, and appends the pick to
  // the result, or `fill` in rows already finished; a row finishes when its token is one of
  // `eos` (done bool [B]: rows finished before the call). The next step feeds those tokens.
  // The loop stops after `steps` steps or the first step after which every row has finished
  // (eos not empty). Returns int64 [B, steps taken]: bit for bit what the same steps through
  // the ops one by one pick (with a prefix: a forward of the P tokens, then single tokens).
  // The new tokens' k/v are written from cache_seqlens on (P - 1 + steps taken of them);
  // cache_seqlens is not changed (the caller commits them).
  // Host memory (csrc/common/hugepages_binding.cpp defines these two with their code, as
  // catch-all functions: no dispatch key, no meta or CUDA variant):
  //   hugepage_arena(int nbytes) -> Tensor
  // uint8 [nbytes] of zeros on the CPU, starting on a 2 MB boundary, advised MADV_HUGEPAGE
  // (Linux; plain zeroed memory elsewhere); unmapped when its last view is freed.
  //   arena_view(Tensor arena, int offset, int[] size, int[] stride, ScalarType dtype)
  //       -> Tensor
  // A tensor of `dtype` over arena's bytes from `offset` (a multiple of the element size)
  // with its own storage, which holds the arena alive; the view must lie inside the arena.
  // Step profile (csrc/fused/step_profile_binding.cpp, a catch-all function as above):
  //   decode_profile(bool? enable=None, bool reset=False) -> float[]
  // The totals of decoder_layers' and greedy_decode's per-part wall time while collection
  // is on: [seconds of each part (step_profile.h's StepPart order)..., decoder_layers
  // calls, greedy_decode steps, 1.0 if collecting else 0.0], read before `enable` switches
  // collection and `reset` zeroes the totals. Off by default (a part's timer costs one
  // branch then); llmcore.ops.profile is its Python face.
}
