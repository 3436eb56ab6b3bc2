"""``vtw_kv="text_only"``: the deep layers (>= K) in KV cache groups of their own, whose blocks hold
a request's text tokens only and are allocated for its text tokens only.

- :class:`TextOnlyAttentionSpec`: the deep attention layers' KV spec (an AttentionSpec with the
  same page layout as full attention, so vLLM's grouping puts the deep layers in group(s) of
  their own; not a FullAttentionSpec subclass, which would merge them back into the full group).
  It carries the visual token ids so that its manager can count.
- :class:`TextOnlyManager`: vLLM's managers see ``(request_id, num_tokens)``; this one turns
  ``num_tokens`` (a prefix of the request's tokens) into the request's text count in that prefix
  (prompt counted once per request, generated tokens live) and allocates for that. Prefix caching
  is off with vtw (see _config), so it never caches nor reuses blocks.
- The worker side (_runner) already writes the deep layers' KV at the text rank through the
  deep groups' own block tables; with this spec those tables hold text-only blocks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import numpy as np

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec

_REQUESTS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
_PROMPT_VISUAL: "weakref.WeakKeyDictionary[object, np.ndarray]" = weakref.WeakKeyDictionary()
_STRONG: dict = {}  # fallback when Request objects do not take weak references


@dataclass(frozen=True, kw_only=True)
class TextOnlyAttentionSpec(AttentionSpec):
    visual_token_ids: tuple = ()

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # at most every token of a request is text
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @property
    def prefix_cacheable(self) -> bool:
        return False

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
        n = self._text(request_id, num_tokens)
        have = len(self.req_to_blocks.get(request_id, ()))
        return max(cdiv(n, self.block_size) - have, 0)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self._text(request_id, num_tokens),
                                           self._text(request_id, num_tokens_main_model))

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens):
        if new_computed_blocks:
            raise RuntimeError("vtw.vllm: text-only KV groups take no prefix-cache hits")
        return super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                                 num_external_computed_tokens)

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries=()):
        return

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        return tuple([] for _ in kv_cache_group_ids), 0


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
