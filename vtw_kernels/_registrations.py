"""Fake (meta) kernels and autograd of the torch.ops.vtw operators, registered at import when
the compiled library `_C` (which defines the schemas) is loaded."""

from __future__ import annotations

import torch

from . import _ext, _validate
from .ops import OPS, _triton_impls


def register() -> None:
    @torch.library.register_fake("vtw::withdraw")
    def _withdraw_fake(hidden, visual_mask, num_keep=None, pad_left=False):
        _validate.check_withdraw(hidden, visual_mask, num_keep)
        B, S, D = hidden.shape
        if num_keep is None:
            # The output length is max(keep_lens): data-dependent, at most S.
            s_keep = torch.library.get_ctx().new_dynamic_size()
            torch._check(s_keep <= S)
        else:
            s_keep = num_keep
        out = hidden.new_empty(B, s_keep, D)
        keep_index = hidden.new_empty(B, s_keep, dtype=torch.long)
        keep_lens = hidden.new_empty(B, dtype=torch.int32)
        return out, keep_index, keep_lens

    @torch.library.register_fake("vtw::compact_kv_")
    def _compact_kv_fake(keys, values, visual_mask):
        _validate.check_compact_kv(keys, values, visual_mask)
        return visual_mask.new_empty(visual_mask.shape[0], dtype=torch.int32)

    @torch.library.register_fake("vtw::varlen_attention")
    def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=None, causal=True):
        _validate.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return torch.empty_like(q, memory_format=torch.contiguous_format)  # the kernels return contiguous

    @torch.library.register_fake("vtw::decode_attention")
    def _decode_fake(q, k_cache, v_cache, cache_seqlens, softmax_scale=None):
        _validate.check_decode(q, k_cache, v_cache, cache_seqlens)
        return torch.empty_like(q, memory_format=torch.contiguous_format)  # the kernels return contiguous

    def _withdraw_setup(ctx, inputs, output):
        hidden = inputs[0]
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(output[1])

    def _withdraw_backward(ctx, grad_out, _grad_index, _grad_lens):
        (keep_index,) = ctx.saved_tensors
        B, S, D = ctx.hidden_shape
        if grad_out is None:
            return None, None, None, None
        # Scatter the gradient back to the kept positions; padding slots land in a scratch
        # row S that is dropped, so withdrawn positions get zeros.
        grad = grad_out.new_zeros(B, S + 1, D)
        index = torch.where(keep_index >= 0, keep_index, S)
        grad.scatter_(1, index[..., None].expand(-1, -1, D), grad_out)
        return grad[:, :S], None, None, None

    torch.library.register_autograd("vtw::withdraw", _withdraw_backward, setup_context=_withdraw_setup)

    # Without compiled CUDA kernels, CUDA tensors reaching torch.ops.vtw.* go to Triton.
    triton_kernels = _triton_impls()
    if triton_kernels is not None:
        for op in OPS:
            if not _ext.has_kernel(op, "CUDA") and hasattr(triton_kernels, op):
                torch.library.register_kernel(f"vtw::{op}", "cuda", getattr(triton_kernels, op))
                _ext.TRITON_ON_CUDA_KEY.add(op)
