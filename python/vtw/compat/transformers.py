"""What differs between the transformers releases vtw supports (5.17 to the newest 5.x), in one
place. The rest of vtw and its tests use these names instead of testing versions.

- **The cache keyword.** transformers 5.17-5.23 pass the KV cache as ``past_key_values`` (to the
  models' ``forward``, to every decoder layer, to ``masking_utils.create_causal_mask``) and
  return it as ``outputs.past_key_values``; 5.24 renamed all of these to ``cache`` (the old
  keyword still works there, deprecated until 5.40). :data:`CACHE_KW` is the name this
  installation uses; :func:`layer_cache` reads a decoder layer's cache from its keywords,
  :func:`output_cache` a model output's cache, :func:`create_causal_mask` passes the cache
  positionally, which every release accepts.

- **Beam search with several pictures in a row** (not vtw's, recorded here because tests meet
  it): transformers 5.17 expands ``pixel_values`` per picture rather than per row for
  ``num_beams`` / ``num_return_sequences``, so in a batch whose rows hold two pictures or none,
  beams get other rows' pictures (seen with the unmodified model: its beam scores differ from a
  cache-free recomputation for such rows; 5.24 is exact). Rows with one picture each are
  expanded correctly by every release.

The version is read from the library itself (the signature of ``create_causal_mask``), not
from its version string, so a patch release that backports the rename is handled too.
"""

from __future__ import annotations

import inspect

import transformers
from transformers import masking_utils as _mu

VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
MIN_VERSION = (5, 17)
if VERSION < MIN_VERSION:
    raise ImportError(f"vtw needs transformers >= {MIN_VERSION[0]}.{MIN_VERSION[1]} (5.x), found "
                      f"{transformers.__version__}: pip install -U 'transformers>=5.17,<6'")

#: The keyword of the KV cache in this transformers: "cache" (5.24+) or "past_key_values".
CACHE_KW: str = "cache" if "cache" in inspect.signature(_mu.create_causal_mask).parameters else "past_key_values"
_OTHER_KW = "past_key_values" if CACHE_KW == "cache" else "cache"


def layer_cache(kwargs: dict):
    """The cache a decoder layer (or model forward) was given in ``kwargs``, or None."""
    cache = kwargs.get(CACHE_KW)
    return cache if cache is not None else kwargs.get(_OTHER_KW)


def output_cache(outputs):
    """The cache a model returned (``outputs.cache`` on 5.24+, ``outputs.past_key_values`` before)."""
    cache = getattr(outputs, CACHE_KW, None)
    return cache if cache is not None else getattr(outputs, _OTHER_KW, None)


def cache_kwargs(cache) -> dict:
    """``{CACHE_KW: cache}``: the keyword argument that passes ``cache`` to a model or generate."""
    return {CACHE_KW: cache}


def create_causal_mask(config, inputs_embeds, attention_mask, cache, **kwargs):
    """``transformers.masking_utils.create_causal_mask`` with the cache passed positionally (its
    fourth parameter in every release; only its name changed)."""
    return _mu.create_causal_mask(config, inputs_embeds, attention_mask, cache, **kwargs)
