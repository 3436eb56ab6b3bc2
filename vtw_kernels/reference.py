"""The `torch` backend: pure-PyTorch versions of every vtw operator, on any device.

They are the reference every other backend is tested against, and a fallback where nothing
compiled is available. Written for clarity over speed; they are differentiable where the op is
(withdraw), and `withdraw` without `num_keep` synchronises with the device to size its output.
"""

from __future__ import annotations

import math

import torch

from . import _validate


def withdraw(hidden: torch.Tensor, visual_mask: torch.Tensor, num_keep: int | None = None,
             pad_left: bool = False):
    B, S, D = hidden.shape
    keep = ~visual_mask
    keep_lens = keep.sum(1, dtype=torch.int32)
    if B > 0:
        max_len, row = (int(x) for x in keep_lens.max(0))
    else:
        max_len, row = 0, 0
    s_keep = max_len if num_keep is None else int(num_keep)
    if s_keep < max_len:
        raise _validate.num_keep_error(s_keep, row, max_len)
    rank = keep.long().cumsum(1) - 1  # rank of each kept token within its row
    slot = rank + (s_keep - keep_lens.long())[:, None] if pad_left else rank
    slot = torch.where(keep, slot, s_keep)  # withdrawn tokens go to a scratch column
    keep_index = torch.full((B, s_keep + 1), -1, dtype=torch.long, device=hidden.device)
    positions = torch.arange(S, device=hidden.device).expand(B, S)
    keep_index.scatter_(1, slot, positions)
    keep_index = keep_index[:, :s_keep].contiguous()
    valid = keep_index >= 0
    if S == 0:
        out = hidden.new_zeros(B, s_keep, D)
    else:
        # Advanced indexing, not gather: CPU gather of float16/bfloat16 goes through float and
        # quiets signalling NaNs, and this op must be a bit-exact copy.
        rows = torch.arange(B, device=hidden.device)[:, None]
        gathered = hidden[rows, keep_index.clamp(min=0)]
        out = torch.where(valid[..., None], gathered, hidden.new_zeros(()))
    return out, keep_index, keep_lens


def compact_kv_(keys, values, visual_mask: torch.Tensor) -> torch.Tensor:
    B, S = visual_mask.shape
    new_lens = (~visual_mask).sum(1, dtype=torch.int32)
    # A stable sort of the mask puts the kept tokens (False) first, in their original order.
    order = torch.sort(visual_mask.to(torch.uint8), dim=1, stable=True).indices
    for t in list(keys) + list(values):
        if t.numel() == 0:
            continue
        H = t.shape[1]
        region = t[:, :, :S]
        rows = torch.arange(B, device=t.device)[:, None, None]
        heads = torch.arange(H, device=t.device)[None, :, None]
        region.copy_(region[rows, heads, order[:, None, :]])  # indexing is bit-exact, gather is not
    return new_lens


def _attend(q, k, v, scale: float, causal: bool, len_q: int, len_k: int) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D] in float32; rows with no key give zeros."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = qf @ kf.transpose(1, 2) * scale  # [Hq, Lq, Lk]
    probs_mask = None
    if causal:
        i = torch.arange(len_q, device=q.device)[:, None]
        j = torch.arange(len_k, device=q.device)[None, :]
        hidden = j > i + (len_k - len_q)
        scores = scores.masked_fill(hidden, float("-inf"))
        probs_mask = (~hidden).any(-1)[None, :, None]  # rows that see at least one key
    probs = torch.softmax(scores, dim=-1)
    if probs_mask is not None:  # fully masked rows -> 0 (a NaN in the data still shows)
        probs = torch.where(probs_mask, probs, 0.0)
    return (probs @ vf).transpose(0, 1)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=None, causal=True):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    _validate.check_varlen_values(cq, ck, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 > q0:
            out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, q1 - q0, k1 - k0).to(q.dtype)
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None):
    B, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros_like(q)
    lens = cache_seqlens.tolist()
    _validate.check_decode_values(lens, k_cache.shape[2])  # never truncate a row silently
    for b, n in enumerate(lens):
        if n > 0:
            k = k_cache[b, :, :n].transpose(0, 1)  # [n, Hkv, D]; nothing past n is read
            v = v_cache[b, :, :n].transpose(0, 1)
            out[b] = _attend(q[b][None], k, v, scale, False, 1, n)[0].to(q.dtype)
    return out
