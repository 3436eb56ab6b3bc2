"""What the demo and the end-to-end benchmark both count and measure: prefill FLOPs by VTW.md's
formula, KV-cache bytes, and a device synchronisation before reading a clock."""

from __future__ import annotations

import torch

__all__ = ["layer_flops", "prefill_flops", "prefill_flops_saved", "kv_bytes", "sync", "fmt_bytes"]


def layer_flops(n: float, d: int, m: int) -> float:
    """Prefill FLOPs of one decoder layer on n tokens (VTW.md): 4nd^2 + 2n^2d + 3ndm."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(n_all: float, n_text: float, d: int, m: int, num_layers: int, k: int | None) -> float:
    """Decoder FLOPs of a prefill with withdrawal at layer k (None: no withdrawal)."""
    k = num_layers if k is None else k
    return k * layer_flops(n_all, d, m) + (num_layers - k) * layer_flops(n_text, d, m)


def kv_bytes(cache) -> list[int]:
    """Bytes of each layer's key and value tensors in `cache` (a transformers Cache)."""
    out = []
    for lay in getattr(cache, "layers", []):
        b = 0
        for t in (getattr(lay, "keys", None), getattr(lay, "values", None)):
            if isinstance(t, torch.Tensor):
                b += t.numel() * t.element_size()
        out.append(b)
    return out


def sync(device) -> None:
    """Waits for `device`'s queued work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def prefill_flops_saved(token_counts, d: int, m: int, num_layers: int, k: int | None) -> float:
    """Fraction of the decoder prefill FLOPs that withdrawal at layer k saves on prompts of
    `token_counts` = [(tokens, text tokens), ...] (each prompt prefilled alone, unpadded): one
    minus the total FLOPs at k over the total of the full model. 0 for no prompts."""
    full = sum(prefill_flops(n, t, d, m, num_layers, None) for n, t in token_counts)
    if not full:
        return 0.0
    return 1.0 - sum(prefill_flops(n, t, d, m, num_layers, k) for n, t in token_counts) / full
