"""The vtw attention kernels as a Hugging Face transformers attention implementation.

Importing this module registers, under the name ``"vtw"``:

- an attention function with ``transformers.AttentionInterface``, so that any model that
  dispatches through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen2-VL, Mistral, ...) runs on
  ``vtw_kernels.varlen_attention`` / ``vtw_kernels.decode_attention``:
  ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="vtw")`` or
  ``model.set_attn_implementation("vtw")``;
- a mask function with ``transformers.masking_utils.AttentionMaskInterface``. Without one,
  transformers 5 builds *no* mask at all for a custom attention name (padding would be
  ignored). Ours returns ``None`` when the mask is exactly causal (bottom-right aligned, no
  padding), and otherwise the boolean ``[B, 1, Q, KV]`` mask of SDPA (True = attend).

How a call is served (``attention_mask`` as received by the attention function):

- ``None``: causal (bottom-right aligned, so a query block after a cache sees the whole past)
  unless the module or the ``is_causal`` keyword says otherwise. One query per row goes to
  ``decode_attention`` over the cache as it is; more go to ``varlen_attention`` with equal
  lengths. No host synchronisation.
- a 4-D boolean mask, or a float mask holding only 0 and "masked" values (``-inf`` or below
  ``finfo.min / 2``): it is analysed once (and cached for the layers that share it) to find, for
  every row, the keys and queries in use. When the mask is "causal + padding" (any padding:
  left, right, or a static cache's unused tail) or "full + padding", the used tokens are packed
  and sent to ``varlen_attention`` (``decode_attention`` when each row has one query and its
  keys are a prefix of the cache, as after ``vtw_kernels.compact_kv_``). The analysis reads the
  mask on the host: one synchronisation per distinct mask.
- anything else (sliding windows shorter than the sequence, packed sequences in one row,
  per-head masks, additive biases, attention sinks ``s_aux``, ``softcap``, dropout > 0, a head
  dim the kernels do not support, or inputs that require grad) runs the exact dense fallback:
  float32 softmax(QK^T * scale + mask) V without repeating K/V, as eager attention computes it.
  It is differentiable. Each reason is logged once, and counted in ``STATS``.

Query rows that see no key (padding rows) get zeros, as with FlashAttention-2. Attention
weights are never returned (``None``), as with SDPA and FlashAttention.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter

import torch

import vtw_kernels
from vtw_kernels import _validate

NAME = "vtw"
# Backend used by the kernels: None picks the fastest for the device ("cpu" on CPU tensors,
# "cuda"/"triton" on CUDA tensors); "torch", "cpu", "cuda" or "triton" force one.
BACKEND: str | None = None
# How many calls took each path: "decode", "varlen", "fallback:<reason>".
STATS: Counter = Counter()

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _note(path: str) -> None:
    STATS[path] += 1
    if path.startswith("fallback") and path not in _logged:
        _logged.add(path)
        logger.warning("vtw attention: %s; using the exact dense fallback for such calls", path.partition(":")[2])


# ----------------------------------------------------------------------------------------------
# The mask function (AttentionMaskInterface)
# ----------------------------------------------------------------------------------------------


def vtw_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True, **kwargs):
    """``None`` when the mask is plain causal with the queries at the end of the keys and no
    padding (the kernels' own causal mask then applies); else SDPA's boolean 4-D mask."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if (
        allow_is_causal_skip
        and mask_function is mu.causal_mask_function
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == kv_offset + kv_length - q_length
        and not torch.compiler.is_compiling()
    ):
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None or bool(padding[:, kv_offset:kv_offset + kv_length].all()):
            return None
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# Mask analysis: is it "causal (or full) + padding", and where are the used tokens?
# ----------------------------------------------------------------------------------------------


class _Plan:
    """Packing of a [B, Q, KV] boolean mask into varlen form."""

    __slots__ = ("causal", "q_b", "q_pos", "k_b", "k_pos", "cu_q", "cu_k", "max_q", "max_k", "lens_k",
                 "keys_are_prefix", "one_query_per_row")


_plan_cache: list[tuple[weakref.ref, int, _Plan | None]] = []


def _binary_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The boolean form (True = attend) of a 4-D mask, or None if it is an arbitrary bias."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    masked = mask <= torch.finfo(mask.dtype).min / 2  # also -inf
    if not bool(((mask == 0) | masked).all()):
        return None
    return ~masked


def _analyse(mask: torch.Tensor) -> _Plan | None:
    m = _binary_mask(mask)
    if m is None or m.dim() != 4 or m.shape[1] != 1:
        return None
    m = m[:, 0]  # [B, Q, KV]
    B, Q, KV = m.shape
    key_used = m.any(1)  # [B, KV]
    lens_k = key_used.sum(1)
    rank_k = key_used.cumsum(1) - 1
    n_vis = m.sum(2)  # [B, Q]
    nonempty = n_vis > 0
    # Full attention + padding: every query that sees something sees every used key.
    full_ok = bool(((n_vis == lens_k[:, None]) | ~nonempty).all())
    # Causal + padding: each used query sees the first rank + 1 + Lk - Lq used keys (bottom-right).
    # Which queries are "used": those that see a key; failing that, for causal self-attention
    # whose queries are the last Q keys, also drop the queries whose own token is masked: they
    # are padding (right padding sees the real keys too). They get zeros, as with
    # FlashAttention-2 in transformers; a real token never sees their values.
    candidates = [nonempty] if full_ok or KV < Q else [nonempty, nonempty & key_used[:, KV - Q:]]
    for q_used in candidates:
        lens_q = q_used.sum(1)
        rank_q = q_used.cumsum(1) - 1
        if full_ok or bool(((n_vis == rank_q + 1 + (lens_k - lens_q)[:, None]) | ~q_used).all()):
            break
    else:
        return None
    # The keys a used query sees are a prefix (in order) of its row's used keys.
    prefix = key_used[:, None, :] & (rank_k[:, None, :] < n_vis[:, :, None])
    if not bool(((m == prefix) | ~q_used[:, :, None]).all()):
        return None
    plan = _Plan()
    plan.causal = not full_ok
    plan.q_b, plan.q_pos = q_used.nonzero(as_tuple=True)
    plan.k_b, plan.k_pos = key_used.nonzero(as_tuple=True)
    zero = torch.zeros(1, dtype=torch.int32, device=m.device)
    plan.cu_q = torch.cat([zero, lens_q.cumsum(0).to(torch.int32)])
    plan.cu_k = torch.cat([zero, lens_k.cumsum(0).to(torch.int32)])
    plan.max_q = int(lens_q.max()) if B else 0
    plan.max_k = int(lens_k.max()) if B else 0
    plan.lens_k = lens_k.to(torch.int32)
    positions = torch.arange(KV, device=m.device)
    plan.keys_are_prefix = torch.equal(key_used, positions[None, :] < lens_k[:, None])
    plan.one_query_per_row = Q == 1
    return plan


def _plan_for(mask: torch.Tensor) -> _Plan | None:
    for ref, version, plan in _plan_cache:
        if ref() is mask and mask._version == version:
            return plan
    plan = _analyse(mask)
    _plan_cache[:] = [e for e in _plan_cache if e[0]() is not None][-3:] + [(weakref.ref(mask), mask._version, plan)]
    return plan


# ----------------------------------------------------------------------------------------------
# The exact fallback
# ----------------------------------------------------------------------------------------------


def dense_attention(query, key, value, attention_mask, scaling, is_causal=True, dropout=0.0, softcap=None,
                    s_aux=None):
    """softmax(Q K^T * scaling + mask) V in float32 with grouped heads (K/V not repeated):
    query [B, Hq, Q, D], key/value [B, Hkv, KV, D], mask bool (True = attend) or additive,
    broadcastable to [B, 1 or Hq, Q, KV]. Returns [B, Q, Hq, D] in query's dtype. A row whose
    keys are all masked by a boolean mask gets zeros."""
    B, Hq, Q, D = query.shape
    Hkv, KV = key.shape[1], key.shape[2]
    G = Hq // Hkv
    q = query.float().reshape(B, Hkv, G, Q, D)
    s = q @ key.float()[:, :, None].transpose(-1, -2) * scaling  # [B, Hkv, G, Q, KV]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is None:
        if is_causal and Q > 1:
            i = torch.arange(Q, device=s.device)[:, None]
            j = torch.arange(KV, device=s.device)[None, :]
            s = s.masked_fill(j > i + (KV - Q), float("-inf"))
    else:
        m = attention_mask
        if m.dim() == 4:
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], Hkv, G, *m.shape[2:])
        m = m[..., -KV:] if m.shape[-1] > KV else m
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    if s_aux is not None:
        sink = s_aux.float().reshape(1, Hkv, G, 1, 1).expand(B, Hkv, G, Q, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key
    if dropout > 0.0:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    out = p @ value.float()[:, :, None]  # [B, Hkv, G, Q, D]
    return out.reshape(B, Hq, Q, D).transpose(1, 2).to(query.dtype)


# ----------------------------------------------------------------------------------------------
# The attention function (AttentionInterface)
# ----------------------------------------------------------------------------------------------


def _fallback_reason(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if kwargs.get("softcap") is not None:
        return "logit softcapping"
    if dropout and dropout > 0.0:
        return "attention dropout"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "inputs require grad (the kernels are forward-only; use torch.no_grad() for them)"
    D = query.shape[-1]
    if D not in _validate.SUPPORTED_HEAD_DIMS or key.shape[-1] != D or value.shape[-1] != D:
        return f"head dim {D} (the kernels take multiples of 16 from 64 to 256)"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16) or key.dtype != query.dtype:
        return f"dtype {query.dtype}"
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        return "a mask that is not [B, 1, Q, KV]"
    return None


def _contig_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def vtw_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, Q, D], key/value [B, Hkv, KV, D] ->
    (attn_output [B, Q, Hq, D], None)."""
    B, Hq, Q, D = query.shape
    Hkv, KV = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"vtw attention: the number of query heads ({Hq}) must be a multiple of the number "
                         f"of KV heads ({Hkv})")

    reason = _fallback_reason(query, key, value, attention_mask, dropout, kwargs)
    plan = None
    if reason is None and attention_mask is not None:
        if attention_mask.shape[-1] != KV or attention_mask.shape[-2] != Q:
            reason = "a mask whose shape does not match the keys"
        else:
            plan = _plan_for(attention_mask)
            if plan is None:
                reason = "a mask that is not causal or full attention plus padding"
    if reason is not None:
        _note("fallback:" + reason)
        out = dense_attention(query, key, value, attention_mask, scale, is_causal=is_causal, dropout=dropout,
                              softcap=kwargs.get("softcap"), s_aux=kwargs.get("s_aux"))
        return out, None

    key, value = _contig_last(key), _contig_last(value)
    if attention_mask is None:
        if Q == 1:
            _note("decode")
            lens = torch.full((B,), KV, dtype=torch.int32, device=query.device)
            out = vtw_kernels.decode_attention(_contig_last(query[:, :, 0]), key, value, lens,
                                               softmax_scale=scale, backend=BACKEND)
            return out[:, None], None
        _note("varlen")
        q = query.transpose(1, 2).reshape(B * Q, Hq, D)
        k = key.transpose(1, 2).reshape(B * KV, Hkv, D)
        v = value.transpose(1, 2).reshape(B * KV, Hkv, D)
        steps = torch.arange(B + 1, dtype=torch.int32, device=query.device)
        out = vtw_kernels.varlen_attention(_contig_last(q), k, v, steps * Q, steps * KV, Q, KV,
                                           softmax_scale=scale, causal=bool(is_causal), backend=BACKEND)
        return out.reshape(B, Q, Hq, D), None

    if plan.one_query_per_row and plan.keys_are_prefix:
        # Every row's keys are positions 0 .. len-1 of the cache: no packing needed.
        _note("decode")
        lens = torch.zeros(B, dtype=torch.int32, device=query.device)
        lens[plan.q_b] = plan.lens_k[plan.q_b]  # a row without a used query gets zeros
        out = vtw_kernels.decode_attention(_contig_last(query[:, :, 0]), key, value, lens,
                                           softmax_scale=scale, backend=BACKEND)
        return out[:, None], None

    _note("varlen")
    q = query.transpose(1, 2)[plan.q_b, plan.q_pos]  # [Tq, Hq, D]
    k = key.transpose(1, 2)[plan.k_b, plan.k_pos]  # [Tk, Hkv, D]
    v = value.transpose(1, 2)[plan.k_b, plan.k_pos]
    packed = vtw_kernels.varlen_attention(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
                                          softmax_scale=scale, causal=plan.causal, backend=BACKEND)
    out = query.new_zeros(B, Q, Hq, D)
    out[plan.q_b, plan.q_pos] = packed
    return out, None


def register() -> None:
    """Registers the attention function and its mask function under the name "vtw"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, vtw_attention_forward)
    AttentionMaskInterface.register(NAME, vtw_mask)


register()
