"""The model families `vtw.enable` knows how to wire, and how to add one.

Withdrawal needs four things from a model, and a :class:`Family` says where to find them:

1. the *outer* module: the one whose ``forward`` receives ``input_ids`` and ``attention_mask``
   and calls the language model (for LLaVA: ``LlavaModel``). vtw hooks it to compute the visual
   mask once per forward, before any decoder layer runs;
2. the *language model* (text decoder) under it, an attribute of the outer module
   (``language_model`` in every Hugging Face multimodal model of transformers 5.x);
3. its decoder layers, an ``nn.ModuleList`` attribute of the language model (``layers``),
   called in order by the language model's own forward as
   ``layer(hidden_states, attention_mask=..., position_embeddings=(cos, sin), position_ids=..., cache=..., **kw)``;
4. the token ids that mark visual tokens, read from config attributes
   (``image_token_id``, ``video_token_id``; the ``*_index`` spellings are aliases in 5.x).

Adding a family is one :func:`register_family` call, for example for a hypothetical model whose
base class is ``MyVLModel`` with ``self.text_decoder.blocks`` and ``config.image_pad_id``::

    from vtw.models import Family, register_family

    register_family(Family(
        name="my-vl",
        base_classes=("MyVLModel",),
        language_model_attr="text_decoder",
        layers_attr="blocks",
        token_id_attrs=("image_pad_id",),
    ))

The decoder layers must take the keyword arguments above (every Llama-, Qwen2- and Mistral-style
decoder of transformers 5.x does), return the new hidden states as a tensor, and use rotary
position embeddings given as ``position_embeddings``. Anything not covered by a registered
family is still wired when it exposes ``model.language_model.layers`` or ``model.model.layers``
(a text-only decoder: pass ``visual_mask=`` to `vtw.enable` then).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Family:
    """How to wire one model family (see the module docstring)."""

    name: str
    #: class names of the outer (multimodal base) model; the model given to `vtw.enable` may be
    #: that class or a wrapper holding it as ``.model`` (the ``...ForConditionalGeneration`` class).
    base_classes: tuple[str, ...]
    #: attribute of the outer module holding the text decoder; None: the outer module is the
    #: text decoder itself (its embeddings merge the vision features, e.g. Phi-4-multimodal).
    language_model_attr: str | None = "language_model"
    layers_attr: str = "layers"
    #: config attributes (of the outer model's config) holding the visual token ids; a dotted
    #: name reads a sub-config (``"vision_config.image_token_id"``).
    token_id_attrs: tuple[str, ...] = ("image_token_id", "video_token_id")
    notes: str = ""
    #: the model's own mask lets a prefix (token_type_ids == 0) attend bidirectionally within
    #: itself (PaliGemma): vtw gathers the prefix block ids into the deep layers' mask.
    prefix_blocks: bool = False


@dataclass
class Wiring:
    """The modules of one model that withdrawal acts on (built by :func:`resolve`)."""

    family: str
    model: nn.Module  # what was given to vtw.enable
    outer: nn.Module  # receives input_ids / attention_mask
    text_model: nn.Module  # the text decoder (owns the layers)
    layers: nn.ModuleList
    token_ids: tuple[int, ...]
    outer_params: tuple[str, ...] = field(default=())  # positional parameter names of outer.forward
    text_params: tuple[str, ...] = field(default=())
    prefix_blocks: bool = False  # see Family.prefix_blocks


FAMILIES: list[Family] = [
    Family("llava", ("LlavaModel",), notes="LLaVA-1.5: image tokens only"),
    Family("llava_next", ("LlavaNextModel",),
           notes="LLaVA-NeXT: AnyRes tiles and the image-newline features all sit on image tokens"),
    Family("llava_next_video", ("LlavaNextVideoModel",)),
    Family("llava_onevision", ("LlavaOnevisionModel",), notes="image and video tokens"),
    Family("video_llava", ("VideoLlavaModel",), notes="image and video tokens"),
    Family("qwen2_vl", ("Qwen2VLModel",),
           notes="M-RoPE: the (cos, sin) built from the 3-D position ids are gathered, so all three "
                 "position streams keep their original values"),
    Family("qwen2_5_vl", ("Qwen2_5_VLModel",), notes="as Qwen2-VL"),
    Family("qwen3_vl", ("Qwen3VLModel",),
           notes="M-RoPE as Qwen2-VL; DeepStack adds vision features to the visual positions after its "
                 "first layers: vtw skips that from layer K on, where no text token attends to them"),
    Family("qwen3_vl_moe", ("Qwen3VLMoeModel",), notes="as Qwen3-VL"),
    Family("qwen3_5", ("Qwen3_5Model",),
           notes="linear-attention layers: only K after the last one (refused below, by layer type)"),
    Family("idefics3", ("Idefics3Model",), language_model_attr="text_model",
           notes="decoder under .text_model; <fake_token_around_image> and <global-img> stay as text"),
    Family("smolvlm", ("SmolVLMModel",), language_model_attr="text_model", notes="as Idefics3"),
    Family("phi4_multimodal", ("Phi4MultimodalModel",), language_model_attr=None,
           token_id_attrs=("vision_config.image_token_id",),
           notes="the decoder merges the image features itself; image tokens withdrawn, audio tokens kept"),
    Family("internvl", ("InternVLModel",)),
    Family("mistral3", ("Mistral3Model",), notes="[IMG_BREAK] and [IMG_END] stay as text"),
    Family("glm4v", ("Glm4vModel",), notes="3-D M-RoPE, as Qwen2-VL"),
    Family("kimi_k25", ("Kimi_K25Model",), notes="MLA attention, MoE"),
    Family("aya_vision", ("AyaVisionModel",),
           notes="Cohere2 text: sliding-window layers (rotary) and full-attention layers (no rotary)"),
    Family("ernie4_5_vl_moe", ("Ernie4_5_VLMoeModel",),
           notes="3-D M-RoPE; its layers route every token to text or vision experts by moe_mm_token_type_ids, "
                 "which vtw gathers with the hidden states"),
    Family("paligemma", ("PaliGemmaModel",), prefix_blocks=True,
           notes="prefix (image and prompt) bidirectional: the deep layers' mask keeps it over the kept prefix tokens"),
]

#: Families vtw refuses, by class name (the outer model or the class given to `vtw.enable`), with
#: the reason. Checked before anything else.
REFUSED: dict[str, str] = {
    "MllamaModel": "vision enters through cross-attention layers (cross_attention_states), not as tokens of "
                   "the sequence: there are no visual tokens to withdraw",
    "MllamaForConditionalGeneration": "see MllamaModel",
    "Llama4Model": "its decoder has chunked-attention and NoPE layers, complex rotary embeddings (freqs_cis) "
                   "and sits two attributes deep (language_model.model.layers); withdrawal of chunked "
                   "layers is not defined",
    "Llama4ForConditionalGeneration": "see Llama4Model",
}


def register_family(family: Family) -> Family:
    """Adds (or replaces, by name) a family; registered families are tried before the built-in ones."""
    if not isinstance(family, Family):
        raise TypeError(f"vtw.models.register_family: family must be a vtw.models.Family, got {type(family).__name__}")
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name]
    FAMILIES.insert(0, family)
    return family


def _param_names(module: nn.Module) -> tuple[str, ...]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _token_ids(config, attrs) -> tuple[int, ...]:
    ids = []
    for name in attrs:
        value = config
        for part in name.split("."):
            value = getattr(value, part, None)
        if isinstance(value, int) and not isinstance(value, bool) and value not in ids:
            ids.append(value)
    return tuple(ids)


def _layers_of(module, attr: str):
    layers = getattr(module, attr, None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def _candidates(model: nn.Module):
    yield model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        yield inner


def resolve(model) -> Wiring:
    """Finds the outer model, the text decoder and its layers of `model`, or raises a TypeError
    that says which class could not be wired and what vtw needs."""
    if not isinstance(model, nn.Module):
        raise TypeError("vtw.enable: model must be a torch.nn.Module (a Hugging Face model), "
                        f"got {type(model).__name__}")
    # 0. Families that cannot be withdrawn exactly.
    for outer in _candidates(model):
        reason = REFUSED.get(type(outer).__name__)
        if reason is not None:
            if reason.startswith("see "):
                reason = REFUSED[reason[4:]]
            raise NotImplementedError(f"vtw.enable: {type(model).__name__} is not supported: {reason}")
    # 1. Registered families, by class name of the outer model.
    for fam in FAMILIES:
        for outer in _candidates(model):
            if type(outer).__name__ not in fam.base_classes:
                continue
            text = outer if fam.language_model_attr is None else getattr(outer, fam.language_model_attr, None)
            layers = _layers_of(text, fam.layers_attr) if isinstance(text, nn.Module) else None
            if layers is None:
                raise TypeError(
                    f"vtw.enable: cannot wire {type(model).__name__}: family {fam.name!r} expects "
                    f"{type(outer).__name__}.{fam.language_model_attr}.{fam.layers_attr} to be a non-empty "
                    "nn.ModuleList of decoder layers")
            w = _wiring(fam.name, model, outer, text, layers, _token_ids(outer.config, fam.token_id_attrs))
            w.prefix_blocks = fam.prefix_blocks
            return w
    # 2. Any multimodal wrapper exposing language_model.layers, or a text-only decoder.
    default_attrs = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    for outer in _candidates(model):
        text = getattr(outer, "language_model", None)
        if isinstance(text, nn.Module) and _layers_of(text, "layers") is not None:
            return _wiring("generic", model, outer, text, text.layers,
                           _token_ids(getattr(outer, "config", None), default_attrs))
    for outer in _candidates(model):
        if _layers_of(outer, "layers") is not None:
            return _wiring("text-only", model, outer, outer, outer.layers,
                           _token_ids(getattr(model, "config", None), default_attrs))
    raise TypeError(
        f"vtw.enable: cannot wire {type(model).__name__}: vtw needs a language model exposing its decoder "
        "layers, i.e. model.language_model.layers, model.model.language_model.layers or model.model.layers "
        "(an nn.ModuleList of decoder layers taking hidden_states, attention_mask, position_embeddings and "
        "cache keywords). Register the family with vtw.models.register_family(Family(...)) if its modules "
        "are named differently")


def _wiring(name, model, outer, text, layers, token_ids) -> Wiring:
    return Wiring(family=name, model=model, outer=outer, text_model=text, layers=layers, token_ids=token_ids,
                  outer_params=_param_names(outer), text_params=_param_names(text))


__all__ = ["FAMILIES", "REFUSED", "Family", "Wiring", "register_family", "resolve"]
