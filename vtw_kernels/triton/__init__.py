"""Triton kernels of the vtw operators (`backend="triton"`).

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set before this package is imported), which is how the tests exercise them without a GPU.
When `vtw_kernels._C` was built without CUDA, they are also the CUDA kernels of torch.ops.vtw.*.

Each function here has the positional signature of its operator's schema (CONTRACT.md):
  withdraw(hidden, visual_mask, num_keep=None, pad_left=False) -> (out, keep_index, keep_lens)
  compact_kv_(keys, values, visual_mask) -> new_lens
  varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale=None, causal=True) -> out
  decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None) -> out
"""

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # Triton is optional
    AVAILABLE = False

if AVAILABLE:
    from ..compat import triton as _compat

    _compat.install_interpreter_fixes()  # before any kernel runs (see compat/triton.py)

    from .attention import *  # noqa: F401,F403  (varlen_attention, decode_attention)
    from .data import *  # noqa: F401,F403  (withdraw, compact_kv_)
