"""``vtw_kv="text_only"``: the deep layers (>= K) in KV cache groups of their own, whose blocks hold
a request's text tokens only and are allocated for its text tokens only.

- :class:`TextOnlyAttentionSpec`: the deep attention layers' KV spec (an AttentionSpec with the
  same page layout as full attention, so vLLM's grouping puts the deep layers in group(s) of
  their own; not a FullAttentionSpec subclass, which would merge them back into the full group).
  It carries the visual token ids so that its manager can count.
- :class:`TextOnlyManager`: vLLM's managers see ``(request_id, num_tokens)``; this one turns
  ``num_tokens`` (a prefix of the request's tokens) into the request's text count in that prefix
  (prompt counted once per request, generated tokens live) and allocates for that.
- Prefix caching: a deep block j holds text ranks [j*bs, (j+1)*bs), which are the positions
  [j*bs, (j+1)*bs) only while no visual token came before. So the manager puts in vLLM's prefix
  cache only the blocks that lie wholly before the request's first visual token (under the block
  hashes of those positions, which then describe them exactly), and looks hits up like full
  attention does. A hit in a deep group therefore never reaches a visual token; _prefix caps
  every group's hit there as well.
- The worker side (_runner) already writes the deep layers' KV at the text rank through the
  deep groups' own block tables; with this spec those tables hold text-only blocks.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, fields

import numpy as np

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

logger = logging.getLogger("vllm.vtw")

_REQUESTS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
_PROMPT_VISUAL: "weakref.WeakKeyDictionary[object, np.ndarray]" = weakref.WeakKeyDictionary()
_STRONG: dict = {}  # fallback when Request objects do not take weak references
_FIRST_VISUAL: "weakref.WeakKeyDictionary[object, list]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True)
class TextOnlyAttentionSpec(AttentionSpec):
    visual_token_ids: tuple = ()

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # at most every token of a request is text
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    def as_full_attention(self) -> FullAttentionSpec:
        """The full-attention spec with this page layout (for vLLM's full-attention hit lookup,
        which reads the block size only and accepts full-attention specs only)."""
        names = {f.name for f in fields(AttentionSpec) if f.init}
        return FullAttentionSpec(**{n: getattr(self, n) for n in names})

    @classmethod
    def from_spec(cls, spec: AttentionSpec, visual_token_ids) -> "TextOnlyAttentionSpec":
        names = {f.name for f in fields(AttentionSpec) if f.init}
        kw = {n: getattr(spec, n) for n in names}
        return cls(**kw, visual_token_ids=tuple(visual_token_ids))


def remember(request) -> None:
    """Called for every request the scheduler receives (Scheduler.add_request)."""
    try:
        _REQUESTS[request.request_id] = request
    except TypeError:
        _STRONG[request.request_id] = request


def forget(request_id: str) -> None:
    _STRONG.pop(request_id, None)


def _request(request_id: str):
    r = _REQUESTS.get(request_id)
    return r if r is not None else _STRONG.get(request_id)


def text_count(request, num_tokens: int, visual: tuple) -> int:
    """Text tokens among the first `num_tokens` tokens of `request` (tokens not yet known, e.g.
    look-ahead slots, count as text)."""
    try:
        pv = _PROMPT_VISUAL.get(request)
    except TypeError:
        pv = None
    if pv is None:
        prompt = np.asarray(list(request.prompt_token_ids or ()), dtype=np.int64)
        pv = np.concatenate([[0], np.cumsum(np.isin(prompt, np.asarray(visual, dtype=np.int64)))])
        try:
            _PROMPT_VISUAL[request] = pv
        except TypeError:
            pass
    P = len(pv) - 1
    if num_tokens <= P:
        return int(num_tokens - pv[num_tokens])
    vis = int(pv[P])
    if num_tokens > P:
        vs = set(visual)
        vis += sum(1 for t in list(request.output_token_ids)[: num_tokens - P] if t in vs)
    return int(num_tokens - vis)


def first_visual(request, visual: tuple) -> int | None:
    """Position of the request's first visual token (prompt, then generated tokens), or None
    while it has none. Generated tokens are scanned once each (remembered per request)."""
    vis = np.asarray(visual, dtype=np.int64)
    try:
        memo = _FIRST_VISUAL.get(request)
    except TypeError:
        memo = None
    if memo is None:
        prompt = np.asarray(list(request.prompt_token_ids or ()), dtype=np.int64)
        hit = np.flatnonzero(np.isin(prompt, vis))
        memo = [int(prompt.size), int(hit[0]) if hit.size else None]  # [tokens scanned, first visual]
        try:
            _FIRST_VISUAL[request] = memo
        except TypeError:
            pass
    if memo[1] is not None:
        return memo[1]
    P = len(request.prompt_token_ids or ())
    out = request.output_token_ids
    if len(out) > memo[0] - P:
        new = np.asarray(list(out)[memo[0] - P:], dtype=np.int64)
        hit = np.flatnonzero(np.isin(new, vis))
        if hit.size:
            memo[1] = memo[0] + int(hit[0])
        memo[0] += int(new.size)
    return memo[1]


class TextOnlyManager(FullAttentionManager):
    """Blocks for the request's text tokens only."""

    def _text(self, request_id: str, num_tokens: int) -> int:
        req = _request(request_id)
        if req is None:  # unknown request: allocate for every token (never too few)
            return num_tokens
        return text_count(req, num_tokens, self.kv_cache_spec.visual_token_ids)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0):
        # a prefix-cache hit lies before the first visual token: there its length (in positions)
        # is also its text count
        return super().get_num_blocks_to_allocate(
            request_id, self._text(request_id, num_tokens), new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, self._text(request_id, num_tokens_main_model),
            apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self._text(request_id, num_tokens),
                                           self._text(request_id, num_tokens_main_model))

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries=()):
        # only the blocks wholly before the first visual token: there text rank == position, so
        # the position block hashes describe the deep blocks exactly
        fv = first_visual(request, self.kv_cache_spec.visual_token_ids)
        if fv is not None:
            num_tokens = min(num_tokens, fv)
        return super().cache_blocks(request, num_tokens, retention_interval, replay_boundaries=replay_boundaries)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        # the cached deep blocks are exactly the position blocks (see cache_blocks): full
        # attention's lookup applies as it is
        return super().find_longest_cache_hit(
            block_hashes=block_hashes, max_length=max_length, kv_cache_group_ids=kv_cache_group_ids,
            block_pool=block_pool, kv_cache_spec=kv_cache_spec.as_full_attention(),
            drop_eagle_block=drop_eagle_block, alignment_tokens=alignment_tokens, dcp_world_size=dcp_world_size,
            pcp_world_size=pcp_world_size)


def requests_that_fit(kv_cache_config, max_len: int, visual: int, vllm_config) -> float:
    """How many requests of `max_len` tokens, `visual` of them visual, fit in the KV cache at
    once: vLLM's per-request block count (the sum over the groups, which share one pool of
    blocks), with a text-only group needing blocks for the ``max_len - visual`` text tokens only."""
    per_request = 0
    for g in kv_cache_config.kv_cache_groups:
        spec = g.kv_cache_spec
        if isinstance(spec, TextOnlyAttentionSpec):
            per_request += cdiv(max_len - visual, spec.block_size)
        else:
            per_request += cdiv(spec.max_memory_usage_bytes(vllm_config), spec.page_size_bytes)
    return kv_cache_config.num_blocks / per_request


def _picture_tokens(vllm_config) -> int | None:
    """The most tokens one picture (image, else video item) takes in this model, as vLLM budgets
    its encoder (None where vLLM cannot say)."""
    try:
        from vllm.multimodal import MULTIMODAL_REGISTRY
        from vllm.multimodal.encoder_budget import MultiModalBudget

        per_item = MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY, enable_cache=False).mm_max_toks_per_item
    except Exception:
        return None
    for m in ("image", "video"):
        if per_item.get(m):
            return int(per_item[m])
    return None


def log_capacity(vllm_config, kv_cache_config, settings) -> str:
    """vtw's start-up line beside vLLM's "Maximum concurrency" (which counts every token in
    every KV cache group): the requests of max_model_len tokens with one picture each that fit."""
    max_len = int(vllm_config.model_config.max_model_len)
    stock = requests_that_fit(kv_cache_config, max_len, 0, vllm_config)
    if settings.kv != "text_only":
        msg = (f"vtw.vllm: withdrawal from decoder layer {settings.layer} (kv: shared): the deep layers keep their KV "
               f"in the same blocks, so {stock:.2f} requests of {max_len} tokens fit at once, as vLLM estimates")
    else:
        pic = _picture_tokens(vllm_config)
        if pic is None:
            msg = (f"vtw.vllm: withdrawal from decoder layer {settings.layer} (kv: text_only): {stock:.2f} requests of "
                   f"{max_len} text tokens fit at once; a request with V visual tokens needs V fewer slots in "
                   "each deep KV cache group (vLLM could not tell the tokens of one picture)")
        else:
            v = min(pic, max_len - 1)
            fit = requests_that_fit(kv_cache_config, max_len, v, vllm_config)
            msg = (f"vtw.vllm: withdrawal from decoder layer {settings.layer} (kv: text_only): {fit:.2f} requests of "
                   f"{max_len} tokens with one {v}-token picture each fit at once ({stock:.2f} of only text, "
                   "which is vLLM's maximum concurrency above: it counts every token in every KV cache group)")
    logger.info(msg)
    return msg


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()  # the built-in specs first (filled only while empty)
    KVCacheSpecRegistry.register(TextOnlyAttentionSpec, TextOnlyManager, uniform_type_base_spec=TextOnlyAttentionSpec)
    _registered = True
    _hook_scheduler()
    from . import _prefix

    _prefix.install()


def _hook_scheduler() -> None:
    import functools

    from vllm.v1.core.sched.scheduler import Scheduler

    orig_add = Scheduler.add_request

    @functools.wraps(orig_add)
    def add_request(self, request, *args, **kwargs):
        remember(request)
        return orig_add(self, request, *args, **kwargs)

    Scheduler.add_request = add_request
    orig_free = getattr(Scheduler, "_free_blocks", None)
    if orig_free is not None:
        @functools.wraps(orig_free)
        def _free_blocks(self, request, *args, **kwargs):
            try:
                return orig_free(self, request, *args, **kwargs)
            finally:
                forget(request.request_id)

        Scheduler._free_blocks = _free_blocks
