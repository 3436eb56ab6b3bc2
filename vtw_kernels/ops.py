"""Typed Python wrappers of the vtw operators: the public API of vtw_kernels.

Each wrapper validates its arguments (without reading tensor data), picks a backend and calls
it. `torch.ops.vtw.*` is the stable low level underneath: it dispatches by device.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch

from . import _ext, _validate, reference

OPS = ("withdraw", "compact_kv_", "varlen_attention", "decode_attention")
BACKENDS = ("torch", "cpu", "cuda", "triton")


class Withdrawn(NamedTuple):
    """Result of `withdraw`: the kept hidden states, their original positions (-1 in padding
    slots) and the number of kept tokens per row."""

    out: torch.Tensor
    keep_index: torch.Tensor
    keep_lens: torch.Tensor

    def check(self) -> "Withdrawn":
        """Raises the ValueError of a too-small ``num_keep`` (the one the CPU and torch backends
        raise at once) if a row kept more tokens than ``out`` has slots; returns self otherwise.
        It reads ``keep_lens``: one host synchronisation on the GPU paths."""
        if self.keep_lens.numel() > 0:
            kept, row = (int(x) for x in self.keep_lens.max(0))
            if kept > self.out.shape[1]:
                raise _validate.num_keep_error(self.out.shape[1], row, kept)
        return self


def _triton_impls():
    """The Triton kernels module, or None when Triton cannot run here."""
    try:
        from . import triton as triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.AVAILABLE else None


def _triton_usable() -> bool:
    if _triton_impls() is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _normalise_op(op_name: str) -> str:
    name = op_name.removeprefix("vtw::").removeprefix("torch.ops.vtw.").removeprefix("vtw.")
    if name not in OPS:
        raise ValueError(f"available_backends: unknown op {op_name!r}; expected one of {OPS}")
    return name


def available_backends(op_name: str) -> list[str]:
    """The backends this installation has for `op_name` ("withdraw", "compact_kv_",
    "varlen_attention" or "decode_attention"), fastest first per device."""
    op = _normalise_op(op_name)
    out = []
    # Not where _registrations put the Triton kernel on the CUDA key (no compiled CUDA kernel).
    if _ext.has_kernel(op, "CUDA") and op not in _ext.TRITON_ON_CUDA_KEY:
        out.append("cuda")
    if _triton_usable() and hasattr(_triton_impls(), op):
        out.append("triton")
    if _ext.has_kernel(op, "CPU"):
        out.append("cpu")
    out.append("torch")
    return out


def _missing(op: str, backend: str) -> RuntimeError:
    if backend == "cpu":
        how = _ext.build_hint() if not _ext.HAS_C else f"this version of vtw has no C++ CPU kernel for {op}"
    elif backend == "cuda":
        if not _ext.HAS_C:
            how = _ext.build_hint()
        elif not _ext.WITH_CUDA:
            how = ("vtw_kernels._C was built without CUDA; rebuild with a CUDA toolkit (nvcc) and a CUDA "
                   "build of torch: VTW_BUILD_CUDA=1 pip install --no-build-isolation -e .")
        else:
            how = f"this version of vtw has no CUDA kernel for {op}"
    else:  # triton
        how = ("install Triton (pip install triton) and run on a CUDA device, or set TRITON_INTERPRET=1 "
               "before importing vtw_kernels to run the Triton kernels on CPU tensors")
    return RuntimeError(f"vtw.{op}: backend {backend!r} is not available: {how}. "
                        f"Available: {available_backends(op)}")


def _pick_backend(op: str, backend: str | None, device: torch.device) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"vtw.{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if torch.compiler.is_dynamo_compiling():
        # Dynamo cannot trace the dispatcher look-ups of available_backends; torch.ops.vtw.*
        # itself dispatches by device (C++ CPU/CUDA kernels, or Triton on the CUDA key).
        if backend in (None, "cpu", "cuda") and _ext.HAS_C:
            return "op"
        return backend or "torch"
    have = available_backends(op)
    if backend is None:
        wanted = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(b for b in wanted if b in have)
    if backend not in have:
        raise _missing(op, backend)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"vtw.{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"vtw.{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    return backend


def withdraw(hidden: torch.Tensor, visual_mask: torch.Tensor, *, num_keep: int | None = None,
             pad_left: bool = False, backend: str | None = None) -> Withdrawn:
    """Withdraws the tokens marked True in `visual_mask` from `hidden`.

    Args:
        hidden: ``[B, S, D]`` float32/float16/bfloat16/float64, last dimension contiguous.
        visual_mask: ``[B, S]`` bool; True marks a token to withdraw.
        num_keep: output length ``S_keep``; default ``max(keep_lens)``. Giving it avoids a host
            synchronisation on the GPU paths. Below a row's kept count it is an error, never a
            truncation. The CPU and torch backends raise ValueError at once. The CUDA and Triton
            backends cannot raise without synchronising, so they make the error visible in the
            result instead, and never write outside it: such a row gets its true count in
            ``keep_lens`` (so ``keep_lens.max() > out.shape[1]`` detects it on the device), -1 in
            every ``keep_index`` slot and quiet NaN in every element of ``out`` (a model fed
            with it produces NaN, not an answer from a truncated prompt). Call
            ``.check()`` on the result to raise the same ValueError (one synchronisation).
        pad_left: right-align the kept tokens of each row (left padding) instead of left-align.
        backend: "torch", "cpu", "cuda", "triton" or None (fastest available for the device).

    Returns:
        ``Withdrawn(out [B, S_keep, D], keep_index [B, S_keep] int64 (-1 in padding slots),
        keep_lens [B] int32)``. ``out`` is an exact copy; padding slots hold zeros.
    """
    _validate.check_withdraw(hidden, visual_mask, num_keep)
    b = _pick_backend("withdraw", backend, hidden.device)
    if b == "torch":
        res = reference.withdraw(hidden, visual_mask, num_keep, pad_left)
    elif b == "triton":
        res = _triton_impls().withdraw(hidden, visual_mask, num_keep, pad_left)
    else:
        res = torch.ops.vtw.withdraw(hidden, visual_mask, num_keep, pad_left)
    return Withdrawn(*res)


def compact_kv_(keys: torch.Tensor | Sequence[torch.Tensor], values: torch.Tensor | Sequence[torch.Tensor],
                visual_mask: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Compacts KV caches in place: in every ``[B, H, S_cap, Dh]`` tensor of `keys` and
    `values` (one per layer, or a single tensor each), the tokens whose `visual_mask` entry is
    False move to positions ``0 .. new_lens[b]-1`` of their row, in order. Positions ``>= S``
    are never touched; slots ``new_lens[b] .. S-1`` hold unspecified values afterwards.

    Returns ``new_lens`` ``[B]`` int32.
    """
    keys = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    _validate.check_compact_kv(keys, values, visual_mask)
    b = _pick_backend("compact_kv_", backend, visual_mask.device)
    if b == "torch":
        return reference.compact_kv_(keys, values, visual_mask)
    if b == "triton":
        return _triton_impls().compact_kv_(keys, values, visual_mask)
    return torch.ops.vtw.compact_kv_(keys, values, visual_mask)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     softmax_scale: float | None = None, causal: bool = True,
                     backend: str | None = None) -> torch.Tensor:
    """Attention over packed variable-length sequences, with FlashAttention-2's
    ``flash_attn_varlen_func`` semantics: `q` ``[Tq, Hq, D]``, `k`/`v` ``[Tk, Hkv, D]``
    (``Hq % Hkv == 0``), `cu_seqlens_*` int32 ``[B+1]``. With `causal`, the mask is aligned to
    the bottom right. Softmax in float32; output ``[Tq, Hq, D]`` in q's dtype."""
    _validate.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    b = _pick_backend("varlen_attention", backend, q.device)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    if b == "torch":
        return reference.varlen_attention(*args)
    if b == "triton":
        return _triton_impls().varlen_attention(*args)
    return torch.ops.vtw.varlen_attention(*args)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """One query token per row over a KV cache: `q` ``[B, Hq, D]``, caches
    ``[B, Hkv, S_cap, D]``, `cache_seqlens` int32 ``[B]``; row b attends to cache positions
    ``0 .. cache_seqlens[b]-1`` only. Output ``[B, Hq, D]`` in q's dtype."""
    _validate.check_decode(q, k_cache, v_cache, cache_seqlens)
    b = _pick_backend("decode_attention", backend, q.device)
    args = (q, k_cache, v_cache, cache_seqlens, softmax_scale)
    if b == "torch":
        return reference.decode_attention(*args)
    if b == "triton":
        return _triton_impls().decode_attention(*args)
    return torch.ops.vtw.decode_attention(*args)
