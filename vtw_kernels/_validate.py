"""Argument checks shared by the Python wrappers, the fake kernels and the pure-PyTorch backend.

They mirror csrc/checks.h (the C++ backends' checks) message for message, so an invalid
argument gets the same error whatever the backend. None of them reads tensor data: they never
synchronise with the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

from .compat import torch as _torch_compat

# What the attention ops compute in (float32 softmax), and what the data-moving ops (withdraw,
# compact_kv_: they only copy bits) take: also float64, for double-precision references.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DATA_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {_dtype_name(t.dtype)}")


def check_data_float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in DATA_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {_dtype_name(t.dtype)}")


def check_same_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_mask(visual_mask: torch.Tensor, op: str) -> None:
    if not isinstance(visual_mask, torch.Tensor):
        raise TypeError(f"{op}: visual_mask must be a tensor, got {type(visual_mask).__name__}")
    if visual_mask.dim() != 2:
        raise ValueError(
            f"{op}: visual_mask must be 2-D [B, S], got {visual_mask.dim()}-D with shape {list(visual_mask.shape)}"
        )
    if visual_mask.dtype != torch.bool:
        raise TypeError(f"{op}: visual_mask must be a bool tensor, got {_dtype_name(visual_mask.dtype)}")


def check_withdraw(hidden: torch.Tensor, visual_mask: torch.Tensor, num_keep) -> None:
    op = "vtw.withdraw"
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{op}: hidden must be a tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be 3-D [B, S, D], got {hidden.dim()}-D with shape {list(hidden.shape)}")
    check_data_float(hidden, op, "hidden")
    check_mask(visual_mask, op)
    check_same_device(visual_mask, hidden, op, "visual_mask", "hidden")
    if tuple(visual_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{op}: visual_mask must have shape [B, S] = {list(hidden.shape[:2])} to match hidden, "
            f"got {list(visual_mask.shape)}"
        )
    if hidden.shape[2] > 1 and hidden.stride(2) != 1:
        raise ValueError(
            f"{op}: hidden must have a contiguous last dimension (stride 1), got strides {list(hidden.stride())}"
        )
    if num_keep is not None:
        if isinstance(num_keep, bool) or not isinstance(num_keep, (int, torch.SymInt)):
            raise TypeError(f"{op}: num_keep must be an int or None, got {type(num_keep).__name__}")
        _torch_compat.check(num_keep >= 0, lambda: f"{op}: num_keep must be >= 0, got {num_keep}")


def num_keep_error(num_keep: int, row: int, kept: int) -> ValueError:
    return ValueError(
        f"vtw.withdraw: num_keep must be >= the number of kept tokens of every row; got num_keep = "
        f"{num_keep} but row {row} keeps {kept} tokens (withdraw never truncates)"
    )


class _Layout(NamedTuple):
    """Where a cache tensor's bytes lie, for the overlap checks of compact_kv_ (checks.h makes
    the same ones): its rows (the contiguous last dimension, `row` bytes each) start at
    ``base + sum(i_d * stride_d)`` over the dimensions of size > 1 (``dims``: (byte stride,
    size) pairs in increasing stride order), and every byte is in [base, end). Pure
    data-pointer and stride arithmetic: nothing is read, nothing synchronises."""

    space: object  # None for real memory, the storage of a fake tensor
    base: int
    index: int  # position in keys, then values
    end: int
    dims: list
    row: int
    name: str


def _layout(t: torch.Tensor, name: str, index: int):
    """The _Layout of a non-empty 4-D cache tensor, or None when it cannot be known: a fake
    tensor (torch.compile, opcheck) has no memory, so its storage and byte offset stand in for
    the address when they are concrete; with symbolic ones only the run-time check (the real
    tensors reach the kernels and their checks) can tell."""
    esz = t.element_size()
    sizes, strides = t.shape, t.stride()
    if type(t) is not torch.Tensor and is_fake(t):  # (is_fake is slow; a plain Tensor is never fake)
        offset = t.storage_offset()
        if not all(isinstance(x, int) for x in (*sizes, *strides, offset)):
            return None
        space, base = t.untyped_storage()._cdata, offset * esz
    else:
        space, base = None, t.data_ptr()
    dims = sorted((strides[d] * esz, sizes[d]) for d in range(3) if sizes[d] > 1)
    row = sizes[3] * esz
    end = base + row
    for st, n in dims:
        end += (n - 1) * st
    return _Layout(space, base, index, end, dims, row, name)


def _overlaps_itself(dims, row: int) -> bool:
    """Whether rows laid out by `dims` may share a byte: True unless, from the smallest stride
    up, every stride reaches past everything the dimensions inside it span (then no two
    distinct indices meet). Exact for every layout a cache takes (dense, sliced, transposed,
    strided, expanded); a contrived interleaving that passes no such nesting is refused too."""
    extent = row
    for st, n in dims:
        if st < extent:
            return True
        extent += (n - 1) * st
    return False


def _provably_disjoint(lo: _Layout, hi: _Layout) -> bool:
    """Whether two tensors whose byte ranges intersect (lo starting first) share no byte. Views
    of one buffer with the same strides (keys and values halves of a fused cache, layers of one
    allocation, keys and values side by side in the last dimension) are the union of a pair
    dimension of stride delta = hi.base - lo.base with their common dimensions; they are
    disjoint when that union nests as in _overlaps_itself. Other layouts whose ranges intersect
    cannot be told apart without enumerating every row, and count as overlapping."""
    if lo.dims != hi.dims:
        return False
    delta = hi.base - lo.base
    e_lo, e_hi = lo.row, hi.row  # what each tensor spans inside the current dimension
    placed = False
    for st, n in lo.dims + [(None, 1)]:
        if not placed and (st is None or delta <= st):
            if delta < e_lo:  # hi's first block starts inside lo's
                return False
            e_lo = e_hi = delta + e_hi
            placed = True
        if st is not None:
            if st < max(e_lo, e_hi):
                return False
            e_lo += (n - 1) * st
            e_hi += (n - 1) * st
    return True


def _check_no_overlap(layouts, op: str) -> None:
    """Raises naming the first two arguments (in keys-then-values order) that share memory.
    A sweep over the byte ranges: only tensors whose ranges intersect are compared."""
    layouts = sorted(layouts, key=lambda x: (x.space is not None, x.space or 0, x.base, x.index))
    active = []
    for cur in layouts:
        active = [a for a in active if a.space == cur.space and a.end > cur.base]
        for a in active:
            if not _provably_disjoint(a, cur):
                first, second = sorted((a, cur), key=lambda x: x.index)
                raise ValueError(
                    f"{op}: {first.name} and {second.name} overlap in memory; compact_kv_ moves tokens in place "
                    "in every cache tensor, so no two of them may share any byte"
                )
        active.append(cur)


def check_compact_kv(keys, values, visual_mask: torch.Tensor) -> None:
    op = "vtw.compact_kv_"
    check_mask(visual_mask, op)
    if len(keys) != len(values):
        raise ValueError(
            f"{op}: keys and values must hold one tensor per layer each, got {len(keys)} keys and {len(values)} values"
        )
    B, S = visual_mask.shape
    H = S_cap = None
    layouts = []
    for list_name, ts in (("keys", keys), ("values", values)):
        for i, t in enumerate(ts):
            name = f"{list_name}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{op}: {name} must be 4-D [B, H, S_cap, Dh], got {t.dim()}-D with shape {list(t.shape)}")
            check_data_float(t, op, name)
            check_same_device(t, visual_mask, op, name, "visual_mask")
            if t.shape[0] != B:
                raise ValueError(
                    f"{op}: {name} must have batch size B = {B} (visual_mask is {list(visual_mask.shape)}), got shape {list(t.shape)}"
                )
            if H is None:
                H, S_cap = t.shape[1], t.shape[2]
            if t.shape[1] != H or t.shape[2] != S_cap:
                raise ValueError(
                    f"{op}: {name} must share H and S_cap with keys[0] ([{H}, {S_cap}]), got shape {list(t.shape)}"
                )
            if t.shape[2] < S:
                raise ValueError(
                    f"{op}: {name} must have S_cap >= S = {S} (the length of visual_mask), got S_cap = {t.shape[2]}"
                )
            if t.shape[3] > 1 and t.stride(3) != 1:
                raise ValueError(
                    f"{op}: {name} must have a contiguous last dimension (stride 1), got strides {list(t.stride())}"
                )
            # Aliasing checks are not traceable by Dynamo; the fake kernel and, at run time, the
            # kernels (checks.h, or this function for Triton) make them under torch.compile.
            if torch.compiler.is_dynamo_compiling():
                continue
            if t.numel() == 0:
                continue
            layout = _layout(t, name, i if list_name == "keys" else len(keys) + i)
            if torch._debug_has_internal_overlap(t) == 1 or (
                    layout is not None and _overlaps_itself(layout.dims, layout.row)):
                raise ValueError(
                    f"{op}: {name} has elements that share memory (an expanded tensor, or strides that make "
                    f"rows overlap: strides {list(t.stride())} for shape {list(t.shape)}); it is written in place, "
                    "so it must not overlap itself"
                )
            if layout is not None:
                layouts.append(layout)
    _check_no_overlap(layouts, op)


# Every multiple of 16 from 64 to 256: the Triton kernels pad the head dim to a power of two
# with masked loads, the CPU kernels loop over it.
SUPPORTED_HEAD_DIMS = tuple(range(64, 257, 16))


def _check_attention_common(q, k, v, op: str, q_rank: int, kv_rank: int, kv_layout: str) -> None:
    for name, t, rank, layout in (("q", q, q_rank, "[T, Hq, D]" if q_rank == 3 else "[B, Hq, D]"),
                                  ("k" if kv_rank == 3 else "k_cache", k, kv_rank, kv_layout),
                                  ("v" if kv_rank == 3 else "v_cache", v, kv_rank, kv_layout)):
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {rank}-D {layout}, got {t.dim()}-D with shape {list(t.shape)}")
        check_float(t, op, name)
        check_same_device(t, q, op, name, "q")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1), got strides {list(t.stride())}")
    kname, vname = ("k", "v") if kv_rank == 3 else ("k_cache", "v_cache")
    for name, t in ((kname, k), (vname, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of q ({_dtype_name(q.dtype)}), got {_dtype_name(t.dtype)}")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D = {D} of q is not supported; expected a multiple of 16 from 64 to 256")
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(
            f"{op}: {kname} and {vname} must have the head dim of q ({D}), got {list(k.shape)} and {list(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{op}: {kname} and {vname} must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    hq, hkv = q.shape[-2], (k.shape[-2] if kv_rank == 3 else k.shape[1])
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: the number of query heads ({hq}) must be a multiple of the number of KV heads ({hkv})")


def _check_lens(t, op: str, name: str, length: int, ref: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {_dtype_name(t.dtype)}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{op}: {name} must be 1-D of length {what} = {length}, got shape {list(t.shape)}")
    check_same_device(t, ref, op, name, "q")


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    op = "vtw.varlen_attention"
    _check_attention_common(q, k, v, op, 3, 3, "[Tk, Hkv, D]")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens_q must be a 1-D int32 tensor of length B+1 >= 1")
    nb = cu_seqlens_q.shape[0]
    _check_lens(cu_seqlens_q, op, "cu_seqlens_q", nb, q, "B+1")
    _check_lens(cu_seqlens_k, op, "cu_seqlens_k", nb, q, "B+1 (the length of cu_seqlens_q)")
    _torch_compat.check(max_seqlen_q >= 0, lambda: f"{op}: max_seqlen_q must be >= 0, got {max_seqlen_q}")
    _torch_compat.check(max_seqlen_k >= 0, lambda: f"{op}: max_seqlen_k must be >= 0, got {max_seqlen_k}")


def check_decode(q, k_cache, v_cache, cache_seqlens) -> None:
    op = "vtw.decode_attention"
    _check_attention_common(q, k_cache, v_cache, op, 3, 4, "[B, Hkv, S_cap, D]")
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k_cache must have the batch size of q ({q.shape[0]}), got shape {list(k_cache.shape)}")
    _check_lens(cache_seqlens, op, "cache_seqlens", q.shape[0], q, "B")


def check_varlen_values(cu_q: list[int], cu_k: list[int], t_q: int, t_k: int, max_seqlen_q: int,
                        max_seqlen_k: int) -> None:
    """Checks the values of cu_seqlens_q/k (already read on the host). The CPU kernel checks the
    same in C++; the GPU kernels cannot without a synchronisation (see vtw_kernels.triton.attention)."""
    op = "vtw.varlen_attention"
    for name, c, t, tname, max_len, max_name in (("cu_seqlens_q", cu_q, t_q, "q", max_seqlen_q, "max_seqlen_q"),
                                                 ("cu_seqlens_k", cu_k, t_k, "k", max_seqlen_k, "max_seqlen_k")):
        if c[0] < 0:
            raise ValueError(f"{op}: {name}[0] must be >= 0, got {c[0]}")
        for b in range(len(c) - 1):
            if c[b + 1] < c[b]:
                raise ValueError(
                    f"{op}: {name} must be non-decreasing, got {name}[{b}] = {c[b]} > {name}[{b + 1}] = {c[b + 1]}"
                )
            if c[b + 1] - c[b] > max_len:
                raise ValueError(
                    f"{op}: {max_name} = {max_len} is smaller than the length {c[b + 1] - c[b]} of sequence {b} ({name})"
                )
        if c[-1] > t:
            raise ValueError(f"{op}: {name}[-1] = {c[-1]} exceeds the number of tokens of {tname} ({t})")


def check_decode_values(lens: list[int], s_cap: int) -> None:
    """Checks the values of cache_seqlens (already read on the host): 0 <= len <= S_cap."""
    for b, n in enumerate(lens):
        if n < 0 or n > s_cap:
            raise ValueError(
                f"vtw.decode_attention: cache_seqlens[{b}] = {n} is outside [0, S_cap = {s_cap}] "
                "(S_cap is k_cache.shape[2])"
            )
