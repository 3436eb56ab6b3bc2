// The schemas of every vtw operator, defined once. Backends register implementations in
// their own files: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA); vtw_kernels/ adds the fake
// (meta) kernels, autograd and, when the CUDA kernels were not built, Triton for CUDA tensors.
#include <torch/library.h>

TORCH_LIBRARY(vtw, m) {
  // Gathers the tokens whose visual_mask is False, per row, in order.
  m.def(
      "withdraw(Tensor hidden, Tensor visual_mask, SymInt? num_keep=None, bool pad_left=False)"
      " -> (Tensor out, Tensor keep_index, Tensor keep_lens)");
  // Moves, in place, the kept tokens of every layer's KV cache to the front of each row.
  m.def("compact_kv_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor visual_mask) -> Tensor new_lens");
  // FlashAttention-2 varlen semantics (causal mask aligned bottom-right).
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
      " SymInt max_seqlen_q, SymInt max_seqlen_k, float? softmax_scale=None, bool causal=True)"
      " -> Tensor");
  // One query per row over a [B, Hkv, S_cap, D] cache with per-row lengths.
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,"
      " float? softmax_scale=None) -> Tensor");
}
