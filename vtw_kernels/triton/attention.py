"""Triton attention kernels over the text-only sequences left by withdrawal.

- `varlen_attention`: FlashAttention-2 style forward over packed variable-length sequences
  (``flash_attn_varlen_func`` semantics). One program per (block of queries, query head,
  sequence); online softmax in float32 over blocks of keys; grouped-query attention reads the
  KV head ``h // (Hq // Hkv)`` directly (K/V are never repeated). With ``causal`` the mask is
  aligned to the bottom right: query i of a sequence with Lq queries and Lk keys sees key j iff
  ``j <= i + Lk - Lq``. A query that sees no key gets zeros (as FlashAttention-2 documents).
- `decode_attention`: flash-decoding. A first kernel splits each row's keys into chunks and
  computes, per (chunk, KV head, row), the partial (max, sum, accumulator) of all the query
  heads of the group at once; a second kernel merges the chunks. A batch with one long row and
  many short ones still fills the GPU, since the long row is spread over many programs.

Guarantees shared by both kernels:

- Head dims are padded to a power of two with masked loads, so every head dim of
  `_validate.SUPPORTED_HEAD_DIMS` runs.
- Nothing is read outside a sequence: every load of K/V is masked by the sequence's bounds
  (masked loads, not multiplications by zero), so stale or NaN values beyond a row's length
  never reach the output.
- float32 inputs use IEEE float32 dot products on the GPU (``input_precision="ieee"``), not TF32.
- Tokens of the packed query buffer that belong to no sequence (past ``cu_seqlens_q[-1]``) get
  zeros, like the reference.
- No host synchronisation: lengths are never read on the host. Invalid length tensors, which
  the CPU and reference backends reject with an error, cannot be checked here without a
  synchronisation; the kernels then never read or write out of bounds and mark the affected
  rows with NaN instead of silently truncating: `decode_attention` when ``cache_seqlens[b]`` is
  negative or larger than ``S_cap``; `varlen_attention` when a sequence's ``cu_seqlens_k`` range
  is decreasing or leaves ``[0, Tk]`` (its query rows become NaN), and for the query rows past
  ``max_seqlen_q`` of a sequence longer than ``max_seqlen_q`` (which sizes the grid).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import _validate
from ._device import on_device

__all__ = ["varlen_attention", "decode_attention"]

_LOG2E = 1.4426950408889634


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _precision(dtype: torch.dtype) -> str | None:
    # float32: true float32 products (no TF32). float16/bfloat16: Triton's default.
    return "ieee" if dtype == torch.float32 else None


def _scale(softmax_scale, head_dim: int) -> float:
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    return float(scale) * _LOG2E  # the kernels work in base 2


# ----------------------------------------------------------------------------------------------
# varlen prefill
# ----------------------------------------------------------------------------------------------


@triton.jit
def _varlen_fwd_kernel(Q, K, V, O, CU_Q, CU_K, Tq, Tk, qk_scale,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_ot, stride_oh,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       PRECISION: tl.constexpr, OFFS_64: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)

    q0 = tl.load(CU_Q + b).to(tl.int64)
    q1 = tl.load(CU_Q + b + 1).to(tl.int64)
    k0 = tl.load(CU_K + b).to(tl.int64)
    k1 = tl.load(CU_K + b + 1).to(tl.int64)
    # Clip the query range to the buffer (never write outside it); a bad key range reads nothing
    # and poisons the sequence's rows with NaN.
    q0 = tl.minimum(tl.maximum(q0, 0), Tq)
    q1 = tl.minimum(tl.maximum(q1, q0), Tq)
    bad_k = (k0 < 0) | (k1 < k0) | (k1 > Tk)
    Lq = (q1 - q0).to(tl.int32)
    Lk = tl.where(bad_k, 0, k1 - k0).to(tl.int32)
    k0 = tl.where(bad_k, 0, k0)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    local_m = tl.arange(0, BLOCK_M)

    # A sequence longer than max_seqlen_q has query blocks no program covers: the last program
    # of the sequence marks them NaN (CPU/reference backends raise instead). Stores only.
    if pid_m == tl.num_programs(0) - 1:
        for mb in range(pid_m + 1, tl.cdiv(Lq, BLOCK_M)):
            rows = mb * BLOCK_M + local_m
            nan = tl.full([BLOCK_M, BLOCK_D], float("nan"), dtype=O.dtype.element_ty)
            tl.store(O + (q0 + mb * BLOCK_M) * stride_ot + h * stride_oh + local_m[:, None] * stride_ot
                     + offs_d[None, :], nan, mask=(rows < Lq)[:, None] & d_mask[None, :])

    start_m = pid_m * BLOCK_M
    if start_m >= Lq:
        return
    offs_m = start_m + local_m
    m_mask = offs_m < Lq
    q_ptrs = Q + (q0 + start_m) * stride_qt + h * stride_qh + local_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    kvh = h // GROUP
    k_base = K + k0 * stride_kt + kvh * stride_kh
    v_base = V + k0 * stride_vt + kvh * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    diag = Lk - Lq  # causal, bottom right: query i sees key j iff j <= i + diag
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), Lk)
    else:
        hi = Lk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cur_n = start_n + offs_n
        n_mask = cur_n < Lk
        # 32-bit offsets from the sequence's (64-bit) base unless a sequence can pass 2^31
        # elements (OFFS_64, decided on the host from the buffer sizes).
        key_idx = cur_n.to(tl.int64) if OFFS_64 else cur_n
        k = tl.load(k_base + key_idx[None, :] * stride_kt + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (cur_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep m = -inf: subtract 0 instead, so that
        # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + key_idx[:, None] * stride_vt + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # A row that sees no key (l = 0) gets zeros.
    l_div = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_div[:, None]
    out = tl.where(bad_k, float("nan"), out)
    o_ptrs = O + (q0 + start_m) * stride_ot + h * stride_oh + local_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def varlen_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the varlen kernel on a GPU for this dtype and
    padded head dim. Every entry compiles for sm_90a without register spills under Triton 3.6,
    3.8 and 3.9 (tests/test_attention.py checks each one ahead of time with ptxas)."""
    if dtype == torch.float32:  # IEEE float32 products run on the FMA units: small tiles
        return {64: (32, 32, 4, 1), 128: (32, 16, 4, 1)}.get(block_d, (16, 16, 8, 1))
    if block_d <= 128:
        # measured on an H200 (bench/gpu_tune_varlen.py, 2026-12-04, Triton 3.6): the fastest of 8
        # tilings on 7 of 8 equal/ragged bf16 shapes, 1.1-1.4x over the former 128 x 64 / 8 warps
        return 64, 64, 4, 3
    # 64 x 32 (8 warps) spilled 116-120 bytes under Triton 3.6; 64 x 16 uses 255 registers
    # there (220 under 3.8) and spills nothing.
    return 64, 16, 8, 1


def decode_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split-K decode kernel on a GPU; spill-free as
    varlen_config's entries are (checked the same way)."""
    if dtype == torch.float32:
        return (32 if block_d <= 128 else 16), 4, 1
    return (64 if block_d <= 128 else 32), 4, 2


def reduce_config(block_d: int, num_splits: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps) of the split-merge kernel: all the splits' maxima and sums
    at once, the accumulators BLOCK_C splits at a time (at most 4096 float32 in flight)."""
    block_s = triton.next_power_of_2(max(num_splits, 1))
    return block_s, max(1, min(block_s, 4096 // block_d)), 4


def _varlen_blocks(q: torch.Tensor, block_d: int) -> tuple[int, int, int, int]:
    if _interpreting(q):
        return 32, 32, 4, 1
    return varlen_config(q.dtype, block_d)


def _needs_64bit_offsets(*ts: torch.Tensor) -> bool:
    """Whether an offset inside one of these tensors can pass 2^31 - 1 elements."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) >= 2**31 - 1 for t in ts)


def _varlen_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal,
                   block_m=None, block_n=None):
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    B = cu_seqlens_q.shape[0] - 1
    # Zeros: tokens of the packed buffer outside every sequence keep a defined value.
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if B == 0 or Tq == 0 or Hq == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = _varlen_blocks(q, block_d)
    bm = block_m or bm
    bn = block_n or bn
    # max_seqlen_q sizes the grid (FlashAttention's convention); rows of a longer sequence are
    # NaN, never silently dropped.
    n_m = max(1, triton.cdiv(int(max_seqlen_q), bm))
    grid = (n_m, Hq, B)
    with on_device(q):
        _varlen_fwd_kernel[grid](
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, Tq, Tk, _scale(softmax_scale, D),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=bool(causal),
            PRECISION=_precision(q.dtype), OFFS_64=_needs_64bit_offsets(q, k, v, out),
            num_warps=warps, num_stages=stages,
        )
    return out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=None, causal=True):
    """Triton `vtw::varlen_attention` (schema order). See the module docstring."""
    _validate.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _varlen_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal)


# ----------------------------------------------------------------------------------------------
# split-K decode
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(Q, K, V, LENS, O, M_PART, L_PART, ACC_PART, S_cap, chunk, qk_scale,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         PRECISION: tl.constexpr, OFFS_64: tl.constexpr):
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    Hq = tl.num_programs(1) * GROUP

    n = tl.load(LENS + b)
    bad = (n < 0) | (n > S_cap)
    n = tl.minimum(tl.maximum(n, 0), S_cap)  # loads stay inside the cache even for a bad length
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cur_n = start_n + offs_n
        n_mask = cur_n < end
        key_idx = cur_n.to(tl.int64) if OFFS_64 else cur_n
        k = tl.load(k_base + key_idx[None, :] * stride_ks + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + key_idx[:, None] * stride_vs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        l_div = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_div[:, None]
        out = tl.where(bad, float("nan"), out)
        tl.store(O + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # Partials are laid out [B, Hq, NUM_SPLITS] (and [..., HEAD_DIM] for the accumulator).
        part = (b64 * Hq + heads) * NUM_SPLITS + split
        tl.store(M_PART + part, m_i, mask=g_mask)
        tl.store(L_PART + part, l_i, mask=g_mask)
        tl.store(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(LENS, O, M_PART, L_PART, ACC_PART, S_cap, stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    Hq = tl.num_programs(0)
    base = (b.to(tl.int64) * Hq + h) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m = tl.load(M_PART + base + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(L_PART + base + offs_s, mask=s_mask, other=0.0)
    m_g = tl.max(m, 0)
    m_sub = tl.where(m_g == float("-inf"), 0.0, m_g)
    l_sum = tl.sum(tl.math.exp2(m - m_sub) * l, 0)  # splits that saw no key have m = -inf: weight 0
    # The accumulators are merged BLOCK_C splits at a time: a [BLOCK_C, BLOCK_D] float32 tile
    # stays small in registers however many splits there are (the whole [128, 256] tile did not).
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for s0 in range(0, NUM_SPLITS, BLOCK_C):
        c = s0 + offs_c
        c_mask = c < NUM_SPLITS
        w = tl.math.exp2(tl.load(M_PART + base + c, mask=c_mask, other=float("-inf")) - m_sub)
        a = tl.load(ACC_PART + (base + c)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * a, 0)
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
    n = tl.load(LENS + b)
    out = tl.where((n < 0) | (n > S_cap), float("nan"), out)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, to exercise the merge
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _decode_launch(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits=None, block_n=None):
    B, Hq, D = q.shape
    _, Hkv, S_cap, _ = k_cache.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    group = Hq // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    if _interpreting(q):
        cfg_n, warps, stages = 32, 4, 1
    else:
        cfg_n, warps, stages = decode_config(q.dtype, block_d)
    block_n = block_n or cfg_n
    n_blocks = max(1, triton.cdiv(S_cap, block_n))
    if num_splits is None:
        # Enough programs to fill the GPU about twice, splits of at least 4 key blocks. The
        # lengths are not read on the host: splits past a row's length return at once.
        want = triton.cdiv(2 * _sm_count(q.device), B * Hkv)
        num_splits = max(1, min(want, triton.cdiv(n_blocks, 4), 128))
    num_splits = max(1, min(int(num_splits), n_blocks))
    chunk = triton.cdiv(n_blocks, num_splits) * block_n
    num_splits = triton.cdiv(max(S_cap, 1), chunk)
    if num_splits > 1:
        m_part = torch.empty(B, Hq, num_splits, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(B, Hq, num_splits, D, device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = out  # unused
    with on_device(q):
        _decode_split_kernel[(num_splits, Hkv, B)](
            q, k_cache, v_cache, cache_seqlens, out, m_part, l_part, acc_part, S_cap, chunk,
            _scale(softmax_scale, D),
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n,
            NUM_SPLITS=num_splits, PRECISION=_precision(q.dtype),
            OFFS_64=_needs_64bit_offsets(k_cache[0], v_cache[0]), num_warps=warps, num_stages=stages,
        )
        if num_splits > 1:
            block_s, block_c, r_warps = reduce_config(block_d, num_splits)
            _decode_reduce_kernel[(Hq, B)](
                cache_seqlens, out, m_part, l_part, acc_part, S_cap, out.stride(0), out.stride(1),
                HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=num_splits, BLOCK_S=block_s, BLOCK_C=block_c,
                num_warps=r_warps,
            )
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None):
    """Triton `vtw::decode_attention` (schema order). See the module docstring."""
    _validate.check_decode(q, k_cache, v_cache, cache_seqlens)
    return _decode_launch(q, k_cache, v_cache, cache_seqlens, softmax_scale)
