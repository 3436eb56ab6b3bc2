"""Triton kernels that move tokens: withdraw and compact_kv_.

They only move bits. Hidden states and caches (float64, float32, float16, bfloat16) are handled
as integer words (int64, int32 or int16, the widest that every address, stride and row length
allows, never narrower than an element: float64 always moves as int64), never as
floats, so every copy is exact, also under Triton's interpreter (whose bfloat16 arithmetic is
broken).

withdraw: program (b, c, p) owns output slots [c*BLOCK_J, (c+1)*BLOCK_J) of row b, and the
p-th share of the hidden dimension. It counts the row's kept tokens, finds the source of each
of its slots by matching the slots' ranks against a `tl.cumsum` of the mask, then copies.
A `num_keep` below a row's kept count ("overflow") never writes outside the output nor
truncates silently: keep_lens holds the true count and the row is poisoned (keep_index all -1,
out all quiet NaN); see vtw_kernels.withdraw and Withdrawn.check().

compact_kv_: one launch over every tensor (a device table of base addresses and strides);
program i walks stream (tensor, row, head) = unravel(i, [N, B, H]) alone, window by window in
increasing token order; within a window every load happens before a barrier and every store
after it, and a kept token's slot is <= its position, so no write lands on a token not yet
read. Positions >= S are never touched. The table travels host-to-device (pinned, non-blocking)
on every call, so this path is not capturable in a CUDA graph; the CUDA kernel is (up to 80
tensors, passed as a kernel parameter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validate
from ._device import on_device

__all__ = ["withdraw", "compact_kv_"]

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_TL_INT_OF_SIZE = {2: tl.int16, 4: tl.int32, 8: tl.int64}
# Quiet-NaN bit pattern of each dtype, as one element.
_NAN_BITS = {torch.float64: (0x7FF8000000000000, 8), torch.float32: (0x7FC00000, 4), torch.float16: (0x7E00, 2),
             torch.bfloat16: (0x7FC0, 2)}


def _word_size(esz: int, quantities) -> int:
    """The widest word (8, 4 or 2 bytes, at least the element size) dividing every quantity."""
    for w in (8, 4, 2):
        if w >= esz and all(q % w == 0 for q in quantities):
            return w
    return esz


def _nan_word(dtype: torch.dtype, word: int) -> int:
    """The quiet-NaN element of `dtype` repeated over a word, as a signed integer."""
    bits, esz = _NAN_BITS[dtype]
    value = 0
    for i in range(word // esz):
        value |= bits << (8 * esz * i)
    return value - (1 << (8 * word)) if value >= 1 << (8 * word - 1) else value


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _withdraw_kernel(h_ptr, m_ptr, out_ptr, idx_ptr, lens_ptr,
                     S, S_keep, D, hs0, hs1, ms0, ms1, tiles_per_row, d_per_prog, nan_word,
                     PAD_LEFT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pd = tl.program_id(1)
    b = (pid // tiles_per_row).to(tl.int64)
    jt = pid % tiles_per_row
    offs_s = tl.arange(0, BLOCK_S)
    m_row = m_ptr + b * ms0

    # Pass 1: the row's kept count.
    counts = tl.zeros([BLOCK_S], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        m = tl.load(m_row + s.to(tl.int64) * ms1, mask=s < S, other=1)
        counts += (m == 0).to(tl.int32)
    kept_len = tl.sum(counts, axis=0)
    overflow = kept_len > S_keep

    # Pass 2: the source position of each slot (-1 for padding), matching ranks.
    j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < S_keep
    if PAD_LEFT:
        want = j - (S_keep - kept_len)  # the rank that lands in slot j
    else:
        want = j
    src = tl.full([BLOCK_J], -1, dtype=tl.int32)
    run = kept_len * 0  # kept tokens before the tile
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        m = tl.load(m_row + s.to(tl.int64) * ms1, mask=s < S, other=1)
        kept = m == 0
        ki = kept.to(tl.int32)
        rank = run + tl.cumsum(ki, axis=0) - 1
        hit = (rank[None, :] == want[:, None]) & kept[None, :]
        src = tl.maximum(src, tl.max(tl.where(hit, s[None, :], -1), axis=1))
        run += tl.sum(ki, axis=0)
    src = tl.where(j_ok & (overflow == 0), src, -1)

    if pd == 0:
        tl.store(idx_ptr + b * S_keep + j, src.to(tl.int64), mask=j_ok)
        if jt == 0:
            tl.store(lens_ptr + b, kept_len)  # the true count, even on overflow

    # Copy this program's share of the hidden dimension (words of the data, never floats).
    has_src = src >= 0
    h_rows = h_ptr + b * hs0 + tl.maximum(src, 0).to(tl.int64) * hs1
    o_rows = out_ptr + (b * S_keep + j.to(tl.int64)) * D
    d_lo = pd * d_per_prog
    d_hi = tl.minimum(d_lo + d_per_prog, D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = tl.multiple_of(d0, BLOCK_D) + tl.arange(0, BLOCK_D)  # d_per_prog is a multiple of BLOCK_D
        d_ok = d < d_hi
        x = tl.load(h_rows[:, None] + d[None, :], mask=has_src[:, None] & d_ok[None, :], other=0)
        x = tl.where(overflow, nan_word.to(x.dtype), x)
        tl.store(o_rows[:, None] + d[None, :], x, mask=j_ok[:, None] & d_ok[None, :])


def _words(t: torch.Tensor, word: int) -> torch.Tensor:
    """`t` viewed as integer words of `word` bytes (a view, no copy)."""
    esz = t.element_size()
    same = t.view(_INT_OF_SIZE[esz])
    return same if word == esz else same.view(_INT_OF_SIZE[word])


def _withdraw_impl(hidden, visual_mask, num_keep=None, pad_left=False, *, block_j=None, d_splits=None):
    """withdraw, with the work split open to the tests (block_j slots per program, d_splits
    programs per slot tile across the hidden dimension)."""
    _validate.check_withdraw(hidden, visual_mask, num_keep)
    B, S, D = hidden.shape
    dev = hidden.device
    if S >= 2**31:
        raise ValueError(f"vtw.withdraw: visual_mask must have at most 2^31 - 1 tokens per row "
                         f"(keep_lens is int32), got S = {S}")
    keep_lens = torch.empty(B, dtype=torch.int32, device=dev)
    if num_keep is not None:
        s_keep = int(num_keep)  # no host synchronisation on this path
    elif B > 0:
        s_keep = int((~visual_mask).sum(1).max())  # the one synchronisation: sizes the output
    else:
        s_keep = 0
    out = torch.empty(B, s_keep, D, dtype=hidden.dtype, device=dev)
    keep_index = torch.empty(B, s_keep, dtype=torch.long, device=dev)
    if B == 0:
        return out, keep_index, keep_lens

    esz = hidden.element_size()
    word = esz if D == 0 else _word_size(
        esz, (hidden.data_ptr(), hidden.stride(0) * esz, hidden.stride(1) * esz, D * esz))
    h_words = _words(hidden, word) if D > 0 else hidden.view(_INT_OF_SIZE[esz])
    o_words = _words(out, word) if D > 0 else out.view(_INT_OF_SIZE[esz])
    dw = D * esz // word
    mask_bytes = visual_mask.view(torch.uint8)

    block_j = block_j or 16
    block_s = max(16, min(256, triton.next_power_of_2(max(S, 1))))
    block_d = max(16, min(1024 // word, triton.next_power_of_2(max(dw, 1))))
    tiles_per_row = max(1, triton.cdiv(s_keep, block_j))
    d_chunks = max(1, triton.cdiv(dw, block_d))
    if d_splits is None:  # enough programs for ~4 per SM
        d_splits = min(d_chunks, max(1, triton.cdiv(4 * _num_sms(dev), B * tiles_per_row)))
    d_per_prog = triton.cdiv(d_chunks, d_splits) * block_d
    d_splits = max(1, triton.cdiv(dw, d_per_prog))
    grid = (B * tiles_per_row, d_splits)
    with on_device(hidden):
        _withdraw_kernel[grid](
            h_words, mask_bytes, o_words, keep_index, keep_lens,
            S, s_keep, dw, h_words.stride(0), h_words.stride(1), mask_bytes.stride(0), mask_bytes.stride(1),
            tiles_per_row, d_per_prog, _nan_word(hidden.dtype, word),
            PAD_LEFT=bool(pad_left), BLOCK_J=block_j, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
    return out, keep_index, keep_lens


def withdraw(hidden, visual_mask, num_keep=None, pad_left=False):
    """Triton withdraw (schema: withdraw(hidden, visual_mask, num_keep=None, pad_left=False)
    -> (out, keep_index, keep_lens)). With num_keep: no host synchronisation; a row keeping
    more than num_keep tokens is reported in keep_lens and poisoned (keep_index -1, out NaN)."""
    return _withdraw_impl(hidden, visual_mask, num_keep, pad_left)


@triton.jit
def _compact_kv_kernel(meta_ptr, m_ptr, lens_ptr, B, H, S, ms0, ms1,
                       WORD: tl.constexpr, VEC: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = pid // (B * H)
    bh = pid % (B * H)
    b = bh // H
    h = bh % H
    meta = meta_ptr + t * 5
    base = tl.load(meta)  # byte address of element [0, 0, 0, 0]
    sb = tl.load(meta + 1)  # strides and row length, in words
    sh = tl.load(meta + 2)
    ss = tl.load(meta + 3)
    row = tl.load(meta + 4)
    ptr = base.to(tl.pointer_type(WORD))
    if VEC > 1:  # every address is 16-byte aligned and every stride a multiple of VEC words
        ptr = tl.multiple_of(ptr, 16)  # (on the pointer: int-to-pointer casts drop the hint)
        sb = tl.multiple_of(sb, VEC)
        sh = tl.multiple_of(sh, VEC)
        ss = tl.multiple_of(ss, VEC)
        row = tl.multiple_of(row, VEC)
    stream = ptr + b * sb + h * sh
    offs_w = tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = m_ptr + b * ms0
    done = tl.full([], 0, tl.int32)  # kept tokens before the window
    for s0 in range(0, S, BLOCK_W):
        s = s0 + offs_w
        m = tl.load(m_row + s.to(tl.int64) * ms1, mask=s < S, other=1)
        kept = m == 0
        ki = kept.to(tl.int32)
        dst = done + tl.cumsum(ki, axis=0) - 1
        move = kept & (dst != s)
        if tl.sum(move.to(tl.int32), axis=0) > 0:
            src_rows = stream + s.to(tl.int64) * ss
            dst_rows = stream + dst.to(tl.int64) * ss
            for d0 in range(0, row, BLOCK_D):
                d = tl.multiple_of(d0, BLOCK_D) + offs_d
                io = move[:, None] & (d < row)[None, :]
                x = tl.load(src_rows[:, None] + d[None, :], mask=io)
                tl.debug_barrier()  # every load of the window before any of its stores
                tl.store(dst_rows[:, None] + d[None, :], x, mask=io)
        done += tl.sum(ki, axis=0)
    if (t == 0) & (h == 0):
        tl.store(lens_ptr + b, done)


def compact_kv_(keys, values, visual_mask):
    """Triton compact_kv_ (schema: compact_kv_(keys, values, visual_mask) -> new_lens): one
    launch over every tensor of keys and values."""
    keys = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    _validate.check_compact_kv(keys, values, visual_mask)
    B, S = visual_mask.shape
    dev = visual_mask.device
    if S >= 2**31:
        raise ValueError(f"vtw.compact_kv_: visual_mask must have at most 2^31 - 1 tokens per row "
                         f"(new_lens is int32), got S = {S}")
    tensors = keys + values
    H = tensors[0].shape[1] if tensors else 0
    if B == 0 or H == 0 or not tensors:  # no stream to walk: only the lengths
        return (~visual_mask).sum(1, dtype=torch.int32)

    # Word size and alignment common to every tensor (each tensor's bytes are moved as words).
    quantities = []
    for t in tensors:
        esz = t.element_size()
        if t.shape[3] > 0 and t.numel() > 0:
            quantities += [t.data_ptr(), t.stride(0) * esz, t.stride(1) * esz, t.stride(2) * esz, t.shape[3] * esz]
    min_esz = min(t.element_size() for t in tensors)
    word = _word_size(min_esz, quantities)
    aligned = all(q % 16 == 0 for q in quantities)
    meta = []
    for t in tensors:
        esz = t.element_size()
        row_bytes = t.shape[3] * esz if t.numel() > 0 else 0
        meta.append([t.data_ptr() if row_bytes else 0, t.stride(0) * esz // word, t.stride(1) * esz // word,
                     t.stride(2) * esz // word, row_bytes // word])
    new_lens = torch.empty(B, dtype=torch.int32, device=dev)
    mask_bytes = visual_mask.view(torch.uint8)
    max_row = max(m[4] for m in meta)
    block_d = max(16, min(128, triton.next_power_of_2(max(max_row, 1))))
    block_w = max(16, min(64, 2048 // block_d))
    grid = (len(tensors) * B * H,)
    with on_device(visual_mask):  # the table's copy, on the current stream of the tensors' device, too
        meta_t = torch.tensor(meta, dtype=torch.int64)
        if dev.type == "cuda":  # copied without blocking the host; the pinned block lives until the copy ends
            meta_t = meta_t.pin_memory().to(dev, non_blocking=True)
        _compact_kv_kernel[grid](
            meta_t, mask_bytes, new_lens, B, H, S, mask_bytes.stride(0), mask_bytes.stride(1),
            WORD=_TL_INT_OF_SIZE[word], VEC=16 // word if aligned else 1, BLOCK_W=block_w, BLOCK_D=block_d,
            num_warps=4, num_stages=1,
        )
    return new_lens
