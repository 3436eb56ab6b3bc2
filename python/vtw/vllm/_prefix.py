"""Prefix caching with withdrawal: hits are capped at the request's first visual token.

Why that is exact, in both KV modes. A cached block is found by its block hash, which vLLM
chains over every token id before the block's end (image hashes as extra keys). Take a hit of
length h <= the requesting request's first visual position: its tokens [0, h) are all text, so
the request that wrote those blocks had the same all-text tokens [0, h). Over an all-text prefix
the withdrawn model is the full model (layers >= K see every token), and a text token's rank
equals its position, so every layer's KV in those blocks sits where the requesting request would
have written it: in ``shared`` mode the deep layers' slots r = the positions r, in ``text_only``
the deep groups' blocks j = the position blocks j (_text_only caches only those). Those slots are
written once, when their token is computed, and never again; the result does not depend on K.
Past the first visual token a block's deep slots hold text ranks of tokens that may lie beyond
the block (not covered by its hash, and written later), so no hit may reach there.

So: a shared system prompt, and whole earlier turns of a text-only conversation, are reused; an
image and everything after it is recomputed (also when the same image comes again). Requests
without any visual token hit as in stock vLLM.

The hook (vLLM 0.32, scheduler side, runner-independent): ``Scheduler.__init__`` marks the KV
cache manager of an engine that withdraws; ``KVCacheManager.get_computed_blocks`` (and its KV
connector variant) then lowers the coordinator's maximum hit length to the request's first
visual position for the duration of the lookup, so the coordinator still aligns the hit to its
block sizes and vLLM's hit counters count the capped hit.
"""

from __future__ import annotations

import contextlib
import functools

from . import _config
from ._text_only import first_visual

_installed = False


@contextlib.contextmanager
def _capped(coordinator, cap: int):
    """Within the block, the coordinator's lookups return hits of at most `cap` tokens."""
    if "find_longest_cache_hit" in coordinator.__dict__:  # already capped (a lookup calling another)
        yield
        return
    names = [n for n in ("find_longest_cache_hit", "find_longest_cache_hit_per_group") if hasattr(coordinator, n)]
    for n in names:
        orig = getattr(coordinator, n)

        def capped(block_hashes, max_cache_hit_length, *a, _orig=orig, **k):
            return _orig(block_hashes, min(max_cache_hit_length, cap), *a, **k)

        setattr(coordinator, n, capped)
    try:
        yield
    finally:
        for n in names:
            coordinator.__dict__.pop(n, None)


def cap(manager, request) -> int | None:
    """The longest prefix-cache hit `request` may take from `manager` (a KVCacheManager), or
    None for no cap (stock engine, or a request without a visual token)."""
    visual = getattr(manager, "_vtw_visual", None)
    if visual is None:
        return None
    return first_visual(request, visual)


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    orig_init = Scheduler.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        s = _config.settings(self.vllm_config.model_config)
        if s is not None and s.active:
            self.kv_cache_manager._vtw_visual = tuple(s.token_ids)
            try:
                from ._text_only import log_capacity

                log_capacity(self.vllm_config, self.kv_cache_config, s)
            except Exception as e:  # a figure for the log only: never stop the engine for it
                _config.logger.warning("vtw.vllm: could not work out how many requests fit (%s)", e)

    Scheduler.__init__ = __init__

    for name in ("get_computed_blocks", "get_computed_blocks_for_connector"):
        orig = getattr(KVCacheManager, name, None)
        if orig is None:
            continue

        def lookup(self, request, *args, _orig=orig, **kwargs):
            c = cap(self, request)
            if c is None:
                return _orig(self, request, *args, **kwargs)
            with _capped(self.coordinator, c):
                return _orig(self, request, *args, **kwargs)

        functools.update_wrapper(lookup, orig)
        setattr(KVCacheManager, name, lookup)
