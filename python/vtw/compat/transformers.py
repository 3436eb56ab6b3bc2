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

- **Video-LLaVA's image argument**: ``pixel_values_images`` in 5.17, ``pixel_values`` from 5.18
  (:data:`VIDEO_LLAVA_IMAGES_KW`, read from the model's signature).
- **LLaVA-OneVision's video features**: 5.17 appends the image-newline feature to each video in
  the model's forward, after ``get_video_features``; from 5.18 ``get_video_features`` returns it
  already. :func:`onevision_video_tokens` gives the number of video tokens a video needs on
  either.

Where a signature shows the difference it is read from the library itself, not from the
version string, so a patch release that backports a change is handled too.
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


def _video_llava_images_kw() -> str:
    try:
        from transformers import VideoLlavaForConditionalGeneration
    except ImportError:  # pragma: no cover  (every supported release has it)
        return "pixel_values"
    params = inspect.signature(VideoLlavaForConditionalGeneration.forward).parameters
    return "pixel_values_images" if "pixel_values_images" in params else "pixel_values"


#: The keyword of Video-LLaVA's still images: "pixel_values_images" (5.17) or "pixel_values".
VIDEO_LLAVA_IMAGES_KW: str = _video_llava_images_kw()


def onevision_video_tokens(model, pixel_values_videos) -> int:
    """Video tokens one LLaVA-OneVision video of ``pixel_values_videos`` ([1, frames, C, H, W])
    takes in the prompt: the pooled features of its frames and one image-newline feature."""
    import torch

    with torch.no_grad():
        n = model.model.get_video_features(pixel_values_videos).pooler_output.shape[1]
    return n + 1 if VERSION < (5, 18) else n


def _checkpoint_replays_call() -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" in GradientCheckpointingLayer.__dict__


#: Gradient checkpointing of a decoder layer: transformers 5.17-5.19 checkpoint the module call
#: (the backward replays ``layer(...)``, i.e. vtw's wrapper, after the forward's state is gone);
#: 5.25 checkpoints the class's ``forward`` inside the call (the replay runs the original layer on
#: the arguments vtw gave it). Read from the class, not from the version.
CHECKPOINT_REPLAYS_CALL: bool = _checkpoint_replays_call()


def packed_sequence_ids(position_ids):
    """[B, S] position ids -> [B, S] sequence number of each token, a new sequence starting
    wherever the position does not follow the previous one by 1 (transformers' definition of
    packed sequences, ``masking_utils.find_packed_sequence_indices``, computed on the device)."""
    import torch

    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, dim=-1, prepend=first) != 1).cumsum(-1)


def packed_sequence_mask_function(sequence_ids):
    """A mask function (for ``create_causal_mask``'s ``and_mask_function``) that lets a query see
    only keys of its own packed sequence."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return sequence_ids[batch_idx, q_idx] == sequence_ids[batch_idx, kv_idx]

    return inner


def window_mask_function(positions, window: int):
    """A mask function: key within the sliding window of the query, counted in ORIGINAL positions
    (``positions`` [B, slots]: the position of the token in every deep slot), as transformers'
    sliding window counts them in the unmodified model (q - kv < window)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < window

    return inner


def and_mask_functions(*fns):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        out = fns[0](batch_idx, head_idx, q_idx, kv_idx)
        for f in fns[1:]:
            out = out & f(batch_idx, head_idx, q_idx, kv_idx)
        return out

    return inner
