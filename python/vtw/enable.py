"""`vtw.enable` / `vtw.disable`: Visual Tokens Withdrawal inside a Hugging Face model (transformers 5.x).

How it is wired (see :mod:`vtw.models` for which modules of a model are used):

- A forward pre-hook on the *outer* model (the module that receives ``input_ids``) computes, once
  per forward and before any decoder layer runs, the ``[B, S]`` *withdraw mask*: the visual tokens
  (config image/video token ids, or the user's ``visual_mask`` callable) together with the padding
  of this chunk (``attention_mask == 0``), and the number of slots the deep layers will run on
  (``num_keep``: 1 for a one-token decode step; ``S`` under ``torch.compile``; otherwise the
  largest number of kept tokens in a row, read with one host synchronisation before the layer
  loop, which also tells whether every row keeps that many, i.e. whether the deep layers have
  padding slots at all).
- Each decoder layer's ``forward`` is replaced (instance attribute) by a thin wrapper. Layers
  ``< K`` run unchanged on every token. Layer ``K`` gathers, with ``torch.ops.vtw.withdraw``
  (``num_keep`` given: no host synchronisation), the hidden states, and with the same
  ``keep_index`` the rotary ``(cos, sin)`` (for Qwen2-VL / Qwen2.5-VL those are built from all
  three M-RoPE position streams before the layer loop, so every stream keeps its original
  values), the ``position_ids`` the layers receive (2-D, or ``[streams, B, S]``), and builds the
  deep layers' attention mask from the gathered padding mask (none at all when the host knows
  there is no padding slot, so SDPA runs with ``is_causal`` as in the unmodified model; otherwise
  always applied, never tested for all-True on the host; in a one-token decode step with SDPA it
  is a view of the padding mask). Layers ``>= K`` run on those. The last layer scatters its output
  back to ``[B, S, D]``. Nothing in the loop reads tensor data on the host
  (``tests/test_enable_sync.py``).
- Layers ``>= K`` write text-only KV caches. The cache carries a small record
  (``cache._vtw_book``): the deep layers' ``[B, slots]`` padding mask, which grows with the deep
  caches (a fixed ``[B, max_cache_len]`` buffer for ``StaticCache``). Layout of a deep cache row:
  the prompt's kept tokens in slots ``0 .. n_b - 1`` in order, padding slots up to ``num_keep``,
  then one slot per later token (a later chunk of several tokens again: its kept tokens, then
  padding). The deep layers' mask uses the lengths of layer K's own cache, the shallow layers'
  the usual ones (all tokens); rotary embeddings always use the original position ids. On first
  use vtw mixes a small class into the cache object (``VtwDynamicCache``, ``VtwStaticCache``) so
  that beam reordering, batch selection, cropping and reset keep the record in step, and with
  ``layer == 0`` ``cache.get_seq_length()`` still counts every token seen.

``mode="compact"``: a forward of several tokens (a prefill, a follow-up turn) runs every layer on
every token (so the first generated token is the unmodified model's), the deep layers attending
to their compacted past; then one ``vtw_kernels.compact_kv_`` call moves the kept tokens of all
deep layers' caches to the front of each row, in place. A DynamicCache is then cut to the longest
row (one host synchronisation, after the layer loop); a StaticCache gets its deep layers' lengths
set on the device. One-token decode steps run as in ``"withdraw"``.

What the model returns: at text positions, exactly the withdrawn model's hidden states (and
logits). At withdrawn positions (visual tokens, padding) it returns the hidden state that entered
layer K, passed through the final norm (an "early exit" value), since those tokens do not exist in
the deep layers. Generation only reads the last position, which is text in any prompt that ends
with text. With ``output_hidden_states``, the deep layers' entries are in the withdrawn layout
``[B, num_keep, D]`` (except the last, which is scattered back).

A token carrying an image/video token id is withdrawn wherever it appears, including a generated
one (random-weight models generate such ids; trained ones do not).

Calling the text decoder directly (e.g. its ``forward`` under ``torch.compile(fullgraph=True)``):
pass ``vtw_withdraw_mask=[B, S] bool`` (visual or padding), ``vtw_num_keep=int`` and, in compact
mode, ``vtw_padding_mask=[B, S] bool``; they travel through the decoder's ``**kwargs`` to the
layers, which remove them.

Never silently wrong: `enable` refuses (one error naming the model class and the reason) the
families of ``vtw.models.REFUSED`` and, from layer K on, cross-attention layers, layer types other
than full and sliding attention, decoder-layer parameters vtw does not handle, bidirectional or chunked text
decoders, and (on transformers that replay the whole layer call) gradient checkpointing. At run
time, with Python checks only (no host synchronisation): a per-token ``[B, S, ...]`` tensor
reaching the deep layers through their keywords, and code between deep layers that replaces the
hidden states, raise. Qwen3-VL's DeepStack injection is skipped from layer K on (it only touches
visual positions, which no text token attends to there). Packed sequences (position ids
restarting within a row, no 2-D mask, no cache) keep their boundaries in the deep layers. With a
static cache, ``generate`` keeps passing the model its own 4-D masks; vtw records the chunk's
padding from the 2-D mask they are built from (no per-step growth of any input). At ``layer ==
L`` nothing is installed.

Sliding-window layers from ``layer`` on (Gemma 3): their window counts original positions (the
deep slots' positions are recorded on the cache, ``_Book.pos``, and and-ed into their own mask);
their cache layers are replaced by full ones, dynamic or static, on first use (a sliding cache
evicts by slot count, which in the withdrawn layout could drop tokens inside the window).

Not supported: a 4-D ``attention_mask`` given by the caller (vtw needs the 2-D padding mask),
sliding-window layers from ``layer`` on in compact mode, ``inputs_embeds``
without ``input_ids`` unless ``visual_mask=`` is given, cropping a cache (assisted decoding)
across tokens that were withdrawn. FlashAttention-2 is untested (not installed here).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

import vtw_kernels

from . import models as _models
from .compat import transformers as _tf

MODES = ("withdraw", "compact")
_WITHDRAW_KW = "vtw_withdraw_mask"
_NUM_KEEP_KW = "vtw_num_keep"
_PADDING_KW = "vtw_padding_mask"


# --------------------------------------------------------------------------------------------
# Public API


def enable(model: nn.Module, layer: int, *, visual_mask=None, mode: str = "withdraw") -> nn.Module:
    """Withdraws the visual tokens of `model` from decoder layer `layer` on (in place; returns `model`).

    Args:
        model: a Hugging Face multimodal model (``LlavaForConditionalGeneration``, ``LlavaModel``,
            LLaVA-NeXT, LLaVA-OneVision, Video-LLaVA, Qwen2-VL, Qwen2.5-VL, ...; see :mod:`vtw.models`).
        layer: 0-based index K of the first decoder layer that no longer sees visual tokens;
            ``layer == number of decoder layers`` withdraws nothing and reproduces the model.
        visual_mask: optional callable ``inputs -> [B, S] bool tensor`` (True = visual), called once
            per forward with a dict of the outer model's inputs by name (``input_ids``,
            ``attention_mask``, ``pixel_values``, ...; ``S`` is the length of this forward's chunk).
            Default: the tokens whose id is one of the config's image/video token ids.
        mode: ``"withdraw"`` (the paper's algorithm: layers ``>= K`` never see visual tokens) or
            ``"compact"`` (a forward of several tokens runs every layer on every token, which gives
            the unmodified model's first token, then the KV caches of layers ``>= K`` are compacted
            in place to their text tokens; one-token decode steps run as in ``"withdraw"``).
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"vtw.enable: layer must be an int, got {type(layer).__name__}")
    if visual_mask is not None and not callable(visual_mask):
        raise TypeError("vtw.enable: visual_mask must be a callable taking the model inputs (a dict) and "
                        f"returning a [B, S] bool tensor, got {type(visual_mask).__name__}")
    if mode not in MODES:
        raise ValueError(f"vtw.enable: mode must be one of {MODES}, got {mode!r}")
    wiring = _models.resolve(model)
    num_layers = len(wiring.layers)
    if not 0 <= layer <= num_layers:
        raise ValueError(f"vtw.enable: layer must be in [0, {num_layers}] ({type(wiring.text_model).__name__} has "
                         f"{num_layers} decoder layers; {num_layers} withdraws nothing), got {layer}")
    if visual_mask is None and not wiring.token_ids:
        raise ValueError(f"vtw.enable: {type(model).__name__} has no image/video token id in its config "
                         "(image_token_id, video_token_id); pass visual_mask= (a callable returning the [B, S] "
                         "bool mask of visual tokens)")
    _check_supported(model, wiring, layer, mode)
    if getattr(wiring.text_model, "_vtw_state", None) is not None:
        _uninstall(wiring.text_model._vtw_state)
    state = _State(wiring, layer, mode, visual_mask)
    _install(state)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Restores `model` exactly as it was before `vtw.enable` (in place; returns `model`).
    A model that was not enabled is returned unchanged."""
    state = _state_of(model)
    if state is not None:
        _uninstall(state)
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether `vtw.enable` is in effect on `model`."""
    return _state_of(model) is not None


def _state_of(model: nn.Module):
    try:
        wiring = _models.resolve(model)
    except NotImplementedError:  # a family vtw refuses was never enabled
        return None
    return getattr(wiring.text_model, "_vtw_state", None)


# --------------------------------------------------------------------------------------------
# What vtw can prove exact

#: Decoder-layer parameters vtw handles (gathers, rebuilds, passes through unchanged as they
#: carry no per-token data). Any other named parameter of a layer >= K is refused.
#: Per-token ([B, S]) decoder-layer arguments that vtw gathers to the withdrawn layout with the
#: hidden states (ERNIE-4.5-VL routes every token to its text or vision experts by its type).
_GATHER_KW = ("moe_mm_token_type_ids",)

_LAYER_PARAMS = frozenset({
    "self", "hidden_states", "attention_mask", "position_ids", "position_embeddings", "cache", "past_key_values",
    "past_key_value", "use_cache", "cache_position", "output_attentions", "output_router_logits", "kwargs", "args",
    *_GATHER_KW,
})

_LAYER_TYPE_REASONS = {
    "sliding_attention": "sliding-window layers from K on are handled in mode='withdraw' only",
    "chunked_attention": "chunked attention over withdrawn positions is not defined",
    "linear_attention": "a linear-attention (recurrent) layer has no per-token keys to withdraw from",
    "conv": "a convolution mixes neighbouring tokens, withdrawn or not",
}


def _check_supported(model, wiring: _models.Wiring, layer: int, mode: str = "withdraw") -> None:
    """Refuses, with one error naming the model class and the reason, whatever vtw cannot prove
    gives exactly the withdrawn model from layer `layer` on. Layers < `layer` run unchanged."""
    name = type(model).__name__
    text = wiring.text_model
    tcfg = text.config
    layer_types = getattr(tcfg, "layer_types", None)
    sliding_ok = mode == "withdraw" and isinstance(getattr(tcfg, "sliding_window", None), int)

    def handled(t):
        return t == "full_attention" or (t == "sliding_attention" and sliding_ok)

    for i in range(layer, len(wiring.layers)):
        lay = wiring.layers[i]
        cls = type(lay).__name__
        if "CrossAttention" in cls:
            raise NotImplementedError(f"vtw.enable: {name} is not supported: decoder layer {i} ({cls}) is a "
                                      "cross-attention layer; vision that enters through cross-attention has no "
                                      "tokens to withdraw")
        # (sliding-window layers: their window counts original positions, _deep_causal_mask(window=))
        if layer_types is not None and not handled(layer_types[i]):
            reason = _LAYER_TYPE_REASONS.get(layer_types[i], "vtw handles full- and sliding-attention layers only")
            first_ok = max(j for j, t in enumerate(layer_types) if not handled(t)) + 1
            raise NotImplementedError(
                f"vtw.enable: {name} is not supported at layer={layer}: decoder layer {i} of {type(text).__name__} "
                f"is {layer_types[i]!r} ({reason}); layer must be >= {first_ok}, after the last such layer")
        try:
            params = inspect.signature(type(lay).forward).parameters
        except (TypeError, ValueError):
            params = {}
        extra = [p for p in params if p not in _LAYER_PARAMS]
        if extra:
            raise NotImplementedError(
                f"vtw.enable: {name} is not supported at layer={layer}: decoder layer {i} ({cls}) takes "
                f"{', '.join(extra)}, which vtw does not gather to the withdrawn layout (it handles "
                "attention_mask, position_embeddings, position_ids and the cache)")
    if layer < len(wiring.layers):
        bidir = getattr(tcfg, "use_bidirectional_attention", None)
        # PaliGemma's decoder is "bidirectional" (its attention is not causal by itself): the causal
        # and prefix structure comes from the mask the model builds, which vtw reproduces.
        if bidir and not wiring.prefix_blocks:
            raise NotImplementedError(f"vtw.enable: {name} is not supported: its text decoder attends "
                                      f"bidirectionally (use_bidirectional_attention={bidir!r}); vtw's deep layers "
                                      "are causal")
        if getattr(tcfg, "attention_chunk_size", None) is not None:
            raise NotImplementedError(f"vtw.enable: {name} is not supported: its text decoder uses chunked "
                                      f"attention (attention_chunk_size={tcfg.attention_chunk_size})")
        if _tf.CHECKPOINT_REPLAYS_CALL and any(getattr(lay, "gradient_checkpointing", False)
                                               for lay in wiring.layers[layer:]):
            raise NotImplementedError(_checkpoint_error(name))


def _checkpoint_error(name: str) -> str:
    return (f"vtw.enable: gradient checkpointing with withdrawal is not supported on this transformers "
            f"({_tf.transformers.__version__}: it replays a checkpointed layer through vtw's wrapper after the "
            f"forward's state is gone); disable it on {name} (model.gradient_checkpointing_disable()) or use a "
            "transformers whose checkpointing wraps the layer's forward (5.25 does; 5.17-5.19 replay the whole call)")


# --------------------------------------------------------------------------------------------
# Installation


class _State:
    """Everything vtw keeps on an enabled model, plus the values of the forward in progress."""

    def __init__(self, wiring: _models.Wiring, layer: int, mode: str, visual_mask):
        self.wiring = wiring
        self.layer = layer
        self.mode = mode
        self.visual_mask = visual_mask
        self.num_layers = len(wiring.layers)
        self.token_ids = wiring.token_ids
        self._token_tensors: dict = {}
        self.handles: list = []
        self.generator = None
        self.generator_had_attr = False
        self.generator_attr = None
        self.pending: _Pending | None = None  # the withdraw mask etc. of the forward in progress
        self.deep: _Deep | None = None  # the deep layers' tensors of the forward in progress
        self.in_deep = False  # layer K has run in the forward in progress (DeepStack is skipped from then on)
        types = getattr(wiring.text_model.config, "layer_types", None)
        #: layer type of every decoder layer (None: all full attention), and whether one >= K slides
        self.layer_types = list(types) if types is not None else None
        self.sliding_deep = types is not None and any(t == "sliding_attention" for t in types[layer:])
        self.gen_padding = None  # ((B, S), [B, S] padding or None): generate's, for its next forward (static cache)

    @property
    def config(self):
        return self.wiring.text_model.config

    @property
    def active(self) -> bool:
        return self.layer < self.num_layers

    def token_tensor(self, device):
        t = self._token_tensors.get(device)
        if t is None:
            t = torch.tensor(self.token_ids, dtype=torch.long, device=device)
            self._token_tensors[device] = t
        return t


def _capture_padding(state: _State, orig, *args, **kwargs):
    """Wraps `create_masks_for_generate` while vtw withdraws: for a compileable (static) cache,
    generate builds the model's 4-D masks from its growing 2-D padding mask before each forward.
    The model keeps receiving those fixed-size masks (its own mask path is untouched, so a compiled
    forward does not recompile per step); vtw records this chunk's [B, S] padding, the only part of
    the 2-D mask its deep layers need."""
    am = kwargs.get("attention_mask")
    embeds = kwargs.get("inputs_embeds")
    state.gen_padding = None
    if isinstance(embeds, torch.Tensor):
        B, S = embeds.shape[:2]
        if am is None:  # no padding mask at all (generate drops an all-ones one)
            state.gen_padding = ((B, S), None)
        elif isinstance(am, torch.Tensor) and am.ndim == 2:
            state.gen_padding = ((B, S), am[:, am.shape[1] - S:] == 0)
    return orig(*args, **kwargs)


def _install(state: _State) -> None:
    w = state.wiring
    for i, layer in enumerate(w.layers):
        if "forward" in layer.__dict__:
            raise RuntimeError(f"vtw.enable: decoder layer {i} already has a patched forward (another tool?); "
                               "vtw will not stack on top of it")
    if not state.active:  # layer == L: nothing is withdrawn, nothing is added to the model
        w.text_model._vtw_state = state
        return
    # The hooks and wrappers hold the state itself (no weak reference), so that copy.deepcopy of
    # an enabled model copies the state with it and the copy's hooks act on the copy.
    for i, layer in enumerate(w.layers):
        layer.forward = functools.partial(_layer_forward, state, i, layer)
    # The visual mask, once per forward, before the vision tower and the decoder run.
    state.handles.append(w.outer.register_forward_pre_hook(
        functools.partial(_pre_hook, state, w.outer_params), with_kwargs=True))
    if w.text_model is not w.outer:
        state.handles.append(w.text_model.register_forward_pre_hook(
            functools.partial(_pre_hook, state, w.text_params), with_kwargs=True))
    state.handles.append(w.text_model.register_forward_hook(functools.partial(_clear_hook, state), always_call=True))
    if w.outer is not w.text_model:
        state.handles.append(w.outer.register_forward_hook(functools.partial(_clear_hook, state), always_call=True))
    # Qwen3-VL's DeepStack adds vision features to the visual positions after its first layers;
    # from layer K on those positions are withdrawn (no text token attends to them): skipped.
    if "_deepstack_process" not in w.text_model.__dict__ and callable(getattr(w.text_model, "_deepstack_process", None)):
        w.text_model._deepstack_process = functools.partial(_deepstack, state, w.text_model)
    # generate() builds 4D masks itself for compileable caches: vtw records the padding from them.
    gen = w.model if hasattr(w.model, "generate") else None
    if gen is not None:
        from transformers import masking_utils

        state.generator = gen
        state.generator_had_attr = "create_masks_for_generate" in gen.__dict__
        state.generator_attr = gen.__dict__.get("create_masks_for_generate")
        orig = getattr(gen, "create_masks_for_generate", masking_utils.create_masks_for_generate)
        gen.create_masks_for_generate = functools.partial(_capture_padding, state, orig)
    w.text_model._vtw_state = state


def _deepstack(state: _State, text_model, hidden_states, *args, **kwargs):
    if state.in_deep:
        return hidden_states
    return type(text_model)._deepstack_process(text_model, hidden_states, *args, **kwargs)


def _uninstall(state: _State) -> None:
    w = state.wiring
    for layer in w.layers:
        fwd = layer.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is _layer_forward:
            del layer.forward
    for h in state.handles:
        h.remove()
    state.handles.clear()
    fn = w.text_model.__dict__.get("_deepstack_process")
    if isinstance(fn, functools.partial) and fn.func is _deepstack:
        del w.text_model._deepstack_process
    gen = state.generator
    if gen is not None:
        if state.generator_had_attr:
            gen.create_masks_for_generate = state.generator_attr
        else:
            gen.__dict__.pop("create_masks_for_generate", None)
    state.pending = None
    state.deep = None
    state.in_deep = False
    state.gen_padding = None
    if w.text_model.__dict__.get("_vtw_state") is state:
        del w.text_model._vtw_state


# --------------------------------------------------------------------------------------------
# The visual mask, once per forward


def _pre_hook(state, param_names, module, args, kwargs):
    if not state.active:
        return None
    inputs = dict(zip(param_names, args))
    inputs.update(kwargs)
    is_text = module is state.wiring.text_model and module is not state.wiring.outer
    if is_text and inputs.get("input_ids") is None and state.visual_mask is None:
        return None  # the outer model's hook already did it (the text model gets inputs_embeds)
    if is_text and state.pending is not None and state.visual_mask is not None:
        return None  # the callable gets the outer model's inputs
    state.in_deep = False
    state.pending = _withdraw_mask(state, inputs)
    return None


def _clear_hook(state, module, args, kwargs_or_output, *rest):
    state.pending = None
    state.deep = None
    state.in_deep = False
    return None


def _withdraw_mask(state: _State, inputs: dict):
    ids = inputs.get("input_ids")
    embeds = inputs.get("inputs_embeds")
    ref_tensor = ids if ids is not None else embeds
    if ref_tensor is None:
        raise ValueError("vtw: the model was called without input_ids or inputs_embeds")
    B, S = ref_tensor.shape[0], ref_tensor.shape[1]
    if state.visual_mask is not None:
        vm = state.visual_mask(inputs)
        if not isinstance(vm, torch.Tensor):
            raise TypeError(f"vtw: visual_mask must return a torch.Tensor, got {type(vm).__name__}")
        if vm.dtype != torch.bool:
            raise TypeError(f"vtw: visual_mask must return a bool tensor, got {vm.dtype}")
        if tuple(vm.shape) != (B, S):
            raise ValueError(f"vtw: visual_mask returned a mask of shape {tuple(vm.shape)}, but the inputs are "
                             f"[B, S] = [{B}, {S}]")
        vm = vm.to(ref_tensor.device)
    elif ids is None:
        raise ValueError("vtw: this forward has inputs_embeds but no input_ids, so the visual tokens cannot be "
                         "found from the image/video token ids; pass input_ids, or give vtw.enable a "
                         "visual_mask= callable")
    else:
        vm = torch.isin(ids, state.token_tensor(ids.device))
    am = inputs.get("attention_mask")
    pad = None
    gen_pad, state.gen_padding = state.gen_padding, None
    if am is not None and not (isinstance(am, torch.Tensor) and am.ndim == 2) and gen_pad is not None \
            and gen_pad[0] == (B, S):
        # generate's 4-D masks for a static cache (the model keeps them): the padding of this
        # chunk was recorded from generate's 2-D mask.
        if gen_pad[1] is not None:
            pad = gen_pad[1].to(vm.device)
            vm = vm | pad
    elif am is not None:
        if not isinstance(am, torch.Tensor) or am.ndim != 2:
            raise ValueError("vtw: attention_mask must be the 2D [B, past + S] padding mask (vtw builds the deep "
                             f"layers' masks from it), got {type(am).__name__}"
                             f"{' of shape ' + str(tuple(am.shape)) if isinstance(am, torch.Tensor) else ''}")
        if am.shape[0] != B or am.shape[1] < S:
            raise ValueError(f"vtw: attention_mask has shape {tuple(am.shape)}, expected [{B}, past + {S}]")
        pad = (am[:, am.shape[1] - S:] == 0).to(vm.device)
        vm = vm | pad
    if S <= 1 or torch.compiler.is_compiling() or (state.mode == "compact"):
        num_keep = S  # compact mode does not withdraw in forwards of several tokens
        # Whether every deep slot of this chunk holds a token is known on the host only when
        # nothing can be withdrawn from it: compact mode without padding.
        dense = state.mode == "compact" and S > 1 and pad is None
    elif B == 0:
        num_keep, dense = 1, False
    else:  # one host synchronisation per forward, before the layer loop
        lo, hi = torch.aminmax((~vm).sum(1, dtype=torch.int32))
        lo, hi = torch.stack([lo, hi]).tolist()
        num_keep = max(hi, 1)
        dense = lo == hi and hi > 0  # every row keeps num_keep tokens: no padding slot in the deep layers
    return _Pending(vm, num_keep, pad, dense, _prefix_blocks(state, inputs, S))


def _prefix_blocks(state: _State, inputs: dict, S: int):
    """PaliGemma's prefix: [B, S] block ids (0: prefix, which attends bidirectionally within
    itself; -1: causal), exactly when the model builds its own mask with them (token_type_ids
    given, and an empty cache or pixel values), else None."""
    if not state.wiring.prefix_blocks:
        return None
    tt = inputs.get("token_type_ids")
    if tt is None:
        return None
    cache = _tf.layer_cache(inputs)
    filled = cache is not None and getattr(cache, "is_initialized", False)
    if filled and inputs.get("pixel_values") is None:
        return None  # the model builds a causal mask (a decode step, a text follow-up)
    if filled:
        raise NotImplementedError(
            f"vtw: {type(state.wiring.model).__name__}: a forward with pixel_values over a filled cache (a new "
            "picture in a follow-up turn) gives the prefix mask over this chunk only; vtw does not reproduce that "
            "in the deep layers: start from a new cache")
    if not isinstance(tt, torch.Tensor) or tt.ndim != 2 or tt.shape[1] < S:
        raise ValueError(f"vtw: token_type_ids must be a [B, S] tensor, got "
                         f"{tuple(tt.shape) if isinstance(tt, torch.Tensor) else type(tt).__name__}")
    return torch.where(tt[:, tt.shape[1] - S:] == 0, 0, -1)


class _Pending(NamedTuple):
    withdraw: torch.Tensor  # [B, S] bool: visual or padding
    num_keep: int
    padding: torch.Tensor | None  # [B, S] bool: padding of this chunk
    dense: bool = False  # known on the host: every deep slot of this chunk holds a kept token
    block: torch.Tensor | None = None  # [B, S] prefix block ids (PaliGemma), see _prefix_blocks


# --------------------------------------------------------------------------------------------
# The decoder layers


@dataclass
class _Deep:
    """The deep layers' view of the forward in progress."""

    hidden: torch.Tensor  # [B, num_keep, D], input of layer K
    full: torch.Tensor  # [B, S, D], input of layer K
    keep_index: torch.Tensor  # [B, num_keep] int64, -1 in padding slots
    valid: torch.Tensor  # [B, num_keep] bool
    mask: object  # the deep layers' attention mask (4D tensor, None, ...)
    position_embeddings: tuple | None
    position_ids: torch.Tensor | None
    cache: object = None
    compact: torch.Tensor | None = None  # compact mode, several tokens: the withdraw mask to compact with
    pe_source: tuple | None = None  # the rotary (cos, sin) layer K received, before the gather
    gather_index: torch.Tensor | None = None  # [B, num_keep] (clamped keep_index) when the rotary is gathered
    pe_other: list = field(default_factory=list)  # [(source, gathered)] for other layer types' rotary
    last: object = None  # the previous deep layer's output (what the next one must receive)
    sliding_mask: object = None  # the sliding-window deep layers' mask (window over original positions)
    per_token: dict = field(default_factory=dict)  # _GATHER_KW arguments in the withdrawn layout

    def rotary(self, pe):
        """The deep layers' rotary (cos, sin) for `pe`, the one this layer received: the gathered
        layer-K one, or (a layer type with its own rotary, e.g. Gemma 3's local / global) this one
        gathered with the same index."""
        if pe is None or self.gather_index is None:
            return pe  # nothing gathered (a decode step, compact mode): every slot keeps its token's rotary
        if self.pe_source is not None and pe[0] is self.pe_source[0]:
            return self.position_embeddings
        for src, out in self.pe_other:
            if src[0] is pe[0]:
                return out
        out = tuple(_gather_seq(t, self.gather_index) for t in pe)
        self.pe_other.append((pe, out))
        return out

    def scatter_back(self, out: torch.Tensor) -> torch.Tensor:
        B, S, D = self.full.shape
        if S == 1 and out.shape[1] == 1:  # a decode step: slot 0 is position 0 where valid
            return torch.where(self.valid[..., None], out.to(self.full.dtype), self.full)
        buf = torch.cat([self.full, self.full.new_zeros(B, 1, D)], dim=1)
        index = torch.where(self.valid, self.keep_index, S)
        buf.scatter_(1, index[..., None].expand(-1, -1, D), out.to(buf.dtype))
        return buf[:, :S]


_HANDLED_KW = frozenset({"attention_mask", "position_embeddings", "position_ids", "cache", "past_key_values"})


def _layer_forward(state: _State, idx: int, layer, hidden_states, *args, **kwargs):
    explicit_mask = kwargs.pop(_WITHDRAW_KW, None)
    explicit_keep = kwargs.pop(_NUM_KEEP_KW, None)
    explicit_pad = kwargs.pop(_PADDING_KW, None)
    orig = type(layer).forward
    K = state.layer
    if idx < K:
        return orig(layer, hidden_states, *args, **kwargs)
    if args:
        raise TypeError(f"vtw: decoder layer {idx} was called with {len(args)} extra positional arguments; vtw "
                        "needs attention_mask, position_embeddings, position_ids and cache as keywords")
    if _tf.CHECKPOINT_REPLAYS_CALL and layer.training and getattr(layer, "gradient_checkpointing", False) \
            and torch.is_grad_enabled():
        raise NotImplementedError(_checkpoint_error(type(state.wiring.model).__name__))
    if idx == K:
        B, S = hidden_states.shape[:2]
        for k, v in kwargs.items():
            if k not in _HANDLED_KW and k not in _GATHER_KW and isinstance(v, torch.Tensor) and v.ndim >= 2 and S > 1 \
                    and tuple(v.shape[:2]) == (B, S):
                raise NotImplementedError(
                    f"vtw: decoder layer {idx} of {type(state.wiring.text_model).__name__} received {k!r}, a "
                    f"per-token [B, S, ...] tensor that vtw does not gather to the withdrawn layout; this model "
                    "cannot be withdrawn exactly")
        deep = _begin(state, hidden_states, kwargs, explicit_mask, explicit_keep, explicit_pad)
        state.deep = deep
        state.in_deep = True
        hidden_states = deep.hidden
    else:
        deep = state.deep
        if deep is None:
            raise RuntimeError(f"vtw: decoder layer {idx} ran before layer {K} in this forward")
        if hidden_states is not deep.last:
            raise RuntimeError(
                f"vtw: {type(state.wiring.text_model).__name__} changed the hidden states between decoder layers "
                f"{idx - 1} and {idx} (code between its layers, which vtw cannot carry to the withdrawn layout); "
                "this model cannot be withdrawn exactly at this layer")
    if deep.sliding_mask is not None and state.layer_types[idx] == "sliding_attention":
        kwargs["attention_mask"] = deep.sliding_mask
    else:
        kwargs["attention_mask"] = deep.mask
    if "position_embeddings" in kwargs:
        kwargs["position_embeddings"] = deep.rotary(kwargs["position_embeddings"])
    if "position_ids" in kwargs:
        kwargs["position_ids"] = deep.position_ids
    for k in _GATHER_KW:
        if k in kwargs:
            kwargs[k] = deep.per_token.get(k, kwargs[k])
    out = orig(layer, hidden_states, **kwargs)
    deep.last = out
    if idx == state.num_layers - 1:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"vtw: decoder layer {idx} returned {type(out).__name__}; vtw needs layers that return "
                            "the hidden states as a tensor (transformers 5.x)")
        if deep.compact is not None:
            if deep.cache is not None:
                _compact_deep_caches(state, deep.cache, deep.compact)
        else:
            out = deep.scatter_back(out)
        state.deep = None
    return out


def _gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [1 or B, S, ...] -> [B, n, ...], t[b, index[b, j]] (index >= 0)."""
    B, n = index.shape
    t = t.expand(B, *t.shape[1:])
    idx = index.view(B, n, *([1] * (t.ndim - 2))).expand(B, n, *t.shape[2:])
    return t.gather(1, idx)


@functools.cache
def _op_serves(device_type: str) -> bool:
    """Whether ``torch.ops.vtw.withdraw`` has a kernel for this device type (the C++ CPU or CUDA
    kernel, or Triton on the CUDA key); cached, since the wrapper's backend look-up costs more
    than a decode step's copy."""
    from vtw_kernels import _ext

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and _ext.has_kernel("withdraw", key)


def _withdraw(hidden, mask, num_keep):
    if (torch.compiler.is_compiling() and vtw_kernels.HAS_C) or _op_serves(hidden.device.type):
        # The operator itself checks its arguments (and dispatches by device); the Python
        # wrapper would add its own checks and backend choice, ~0.1 ms per call.
        return torch.ops.vtw.withdraw(hidden, mask, num_keep, False)
    return vtw_kernels.withdraw(hidden, mask, num_keep=num_keep)


def _begin(state: _State, hidden, kwargs, explicit_mask, explicit_keep, explicit_pad) -> _Deep:
    B, S, _ = hidden.shape
    dense = False
    block = None
    if explicit_mask is not None:
        wmask = explicit_mask
        num_keep = S if explicit_keep is None else explicit_keep
        padding = explicit_pad
    elif state.pending is not None:
        wmask, num_keep, padding, dense, block = state.pending
    else:
        raise RuntimeError("vtw: no withdraw mask for this forward: call the model (or its language model) with "
                           "input_ids, or give vtw.enable a visual_mask= callable")
    if tuple(wmask.shape) != (B, S):
        raise ValueError(f"vtw: the visual mask has shape {tuple(wmask.shape)} but decoder layer {state.layer} "
                         f"received hidden states of [B, S] = [{B}, {S}]")
    wmask = wmask.to(hidden.device)
    cache = _tf.layer_cache(kwargs)
    if state.mode == "compact" and S > 1:
        # Every layer sees every token (the unmodified model's output); the deep layers attend to
        # their compacted past and to this chunk, and are compacted once the last layer has run.
        valid = ~padding.to(hidden.device) if padding is not None else torch.ones_like(wmask)
        deep_padding, dense = _deep_padding(state, cache, valid, S, dense)
        mask = _deep_causal_mask(state, hidden, deep_padding, cache, dense, block=block)
        return _Deep(hidden=hidden, full=hidden, keep_index=None, valid=None, mask=mask,
                     position_embeddings=kwargs.get("position_embeddings"), position_ids=kwargs.get("position_ids"),
                     cache=cache, compact=wmask)
    res = _withdraw(hidden, wmask, num_keep)
    out, keep_index = res[0], res[1]  # a Withdrawn tuple, or the op's plain tuple
    valid = keep_index >= 0
    pe_source = pe = kwargs.get("position_embeddings")
    pos = kwargs.get("position_ids")
    gidx = packed = None
    per_token = {}
    if S > 1 or out.shape[1] != 1:
        gidx = keep_index.clamp(min=0)
        if pe is not None:
            pe = tuple(_gather_seq(t, gidx) for t in pe)
        if isinstance(pos, torch.Tensor):
            if pos.ndim == 2:
                if cache is None and padding is None and S > 1:
                    # transformers reads packed sequences (position ids restarting within a row) from
                    # the position ids when there is neither a 2-D mask nor a cache: the deep layers
                    # keep those boundaries, from the sequence number of every kept token.
                    packed = _gather_seq(_tf.packed_sequence_ids(pos.expand(B, -1)), gidx)
                pos = _gather_seq(pos, gidx)
            elif pos.ndim == 3:  # [streams, B, S]
                pos = torch.stack([_gather_seq(p, gidx) for p in pos.unbind(0)])
        if block is not None:  # padding slots join no block
            block = torch.where(valid, _gather_seq(block, gidx), -1)
        for k in _GATHER_KW:
            v = kwargs.get(k)
            if isinstance(v, torch.Tensor) and v.ndim == 2:
                per_token[k] = _gather_seq(v, gidx)
    # else: one token in one slot per row (a decode step): the slot keeps the token's position,
    # so the rotary embeddings and position ids are used as they are (no gather, no copy).
    slot_pos = None
    if state.sliding_deep:  # the window counts original positions: the deep slots' positions are kept
        if not (isinstance(pos, torch.Tensor) and pos.ndim == 2):
            raise NotImplementedError(
                f"vtw: {type(state.wiring.text_model).__name__} has sliding-window layers from layer {state.layer} "
                "on, whose window counts original positions: its decoder layers must receive 2-D position_ids")
        slot_pos = pos.expand(B, -1)
    deep_padding, dense = _deep_padding(state, cache, valid, S, dense, slot_pos)
    mask = _deep_causal_mask(state, out, deep_padding, cache, dense, packed, block)
    sliding = None
    if state.sliding_deep:
        book = getattr(cache, "_vtw_book", None) if cache is not None else None
        all_pos = book.pos if book is not None else slot_pos
        sliding = _deep_causal_mask(state, out, deep_padding, cache, dense, packed, block,
                                    window=(all_pos, state.config.sliding_window))
    return _Deep(hidden=out, full=hidden, keep_index=keep_index, valid=valid, mask=mask,
                 position_embeddings=pe, position_ids=pos, cache=cache, pe_source=pe_source, gather_index=gidx,
                 sliding_mask=sliding, per_token=per_token)


def _deep_causal_mask(state: _State, inputs_embeds, padding, cache, dense: bool = False, packed=None, block=None,
                      window=None):
    """The deep layers' attention mask, without reading tensor data on the host: when the host
    knows that every deep slot holds a token (`dense`), no padding mask is passed (SDPA then runs
    with ``is_causal`` or no mask, as the unmodified model does without padding); otherwise the
    padding mask is always applied (``allow_is_causal_skip=False``), instead of letting
    transformers test it for all-True, which would synchronise with the device here, inside the
    layer loop. `block`: PaliGemma's prefix block ids over the deep slots (bidirectional within
    the kept prefix tokens, as the model's own mask is within the whole prefix)."""
    kw = {} if block is None else {"block_sequence_ids": block}
    # A decoder whose attention is not causal by itself (PaliGemma) always gets an explicit mask.
    skip = not state.wiring.prefix_blocks and window is None
    if window is not None:  # a sliding window over the slots' original positions
        win = _tf.window_mask_function(*window)
        kw["and_mask_function"] = win if packed is None else _tf.and_mask_functions(
            win, _tf.packed_sequence_mask_function(packed))
        view = _DeepView(cache, state.layer) if cache is not None else None
        return _tf.create_causal_mask(state.config, inputs_embeds, None if dense else padding, view,
                                      position_ids=None, layer_idx=state.layer, allow_is_causal_skip=False, **kw)
    if packed is not None:  # packed sequences (no cache): causal within each sequence, over the kept slots
        return _tf.create_causal_mask(state.config, inputs_embeds, padding, None, position_ids=None,
                                      layer_idx=state.layer, allow_is_causal_skip=False,
                                      and_mask_function=_tf.packed_sequence_mask_function(packed), **kw)
    if (block is None and not dense and inputs_embeds.shape[1] == 1 and state.config._attn_implementation in _BOOL_MASK_IMPLS
            and padding.shape[1] == _deep_kv_length(cache, state.layer, 1)):
        # One query per row (a decode step) sees every slot before it: SDPA's boolean mask is the
        # padding mask itself, a view (what create_causal_mask builds from it with several kernels).
        return padding[:, None, None, :]
    view = _DeepView(cache, state.layer) if cache is not None else None
    if dense:
        return _tf.create_causal_mask(state.config, inputs_embeds, None, view, position_ids=None,
                                      layer_idx=state.layer, allow_is_causal_skip=skip, **kw)
    return _tf.create_causal_mask(state.config, inputs_embeds, padding, view, position_ids=None,
                                  layer_idx=state.layer, allow_is_causal_skip=False, **kw)


_BOOL_MASK_IMPLS = ("sdpa", "vtw")  # whose mask function builds SDPA's boolean [B, 1, q, kv] mask


def _deep_kv_length(cache, layer: int, query_length: int) -> int:
    """The key length the deep layers attend over in this forward (-1 for a static cache, whose
    capacity the mask must span)."""
    if cache is None:
        return query_length
    layers = cache.layers
    lay = layers[layer] if layer < len(layers) else None
    if lay is None:
        return query_length
    if _is_static(lay):
        return -1
    return lay.get_seq_length() + query_length


# --------------------------------------------------------------------------------------------
# Cache bookkeeping


class _DeepView:
    """What `create_causal_mask` reads from a cache, for the deep layers: layer K's own lengths."""

    def __init__(self, cache, layer: int):
        self.cache = cache
        self.layer = layer

    @property
    def is_compileable(self):
        return getattr(self.cache, "is_compileable", False)

    def _layer(self):
        layers = self.cache.layers
        return layers[self.layer] if self.layer < len(layers) else None

    def get_query_offset(self, layer_idx: int = 0):
        lay = self._layer()
        return lay.get_seq_length() if lay is not None else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        lay = self._layer()
        return lay.get_mask_sizes(query_length) if lay is not None else (query_length, 0)


class _Book:
    """vtw's record on a cache: the deep layers' padding mask over their slots."""

    def __init__(self, layer: int):
        self.layer = layer
        self.mask: torch.Tensor | None = None  # [B, slots] bool
        self.full_len = None  # K == 0 only: tokens seen by the model (layer 0's cache is text-only)
        self.dense = True  # known on the host: every slot of `mask` is True (no padding slot)
        self.pos: torch.Tensor | None = None  # [B, slots] original positions (sliding deep layers only)


def _is_static(lay) -> bool:
    return lay is not None and hasattr(lay, "max_cache_len") and getattr(lay, "is_compileable", False)


def _deep_padding(state: _State, cache, valid: torch.Tensor, S: int, dense: bool = False, pos=None):
    """The deep layers' padding mask over their slots (past and this chunk's), recorded on the
    cache, and whether the host knows that every one of those slots holds a token (`dense`
    says so for this chunk; the record remembers it for the past)."""
    if cache is None:
        return valid, dense
    K = state.layer
    book = getattr(cache, "_vtw_book", None)
    if book is None or book.layer != K:
        if book is not None:
            raise ValueError(f"vtw: this cache was filled with withdrawal at layer {book.layer}, the model now "
                             f"withdraws at layer {K}; start from a new cache")
        book = _Book(K)
        cache._vtw_book = book
        if not torch.compiler.is_compiling():
            _adopt(cache)
        if state.sliding_deep:
            _unslide(state, cache)
    layers = cache.layers
    lay = layers[K] if K < len(layers) else None
    B, n = valid.shape
    if _is_static(lay):
        if book.mask is None or book.mask.shape[0] != B:
            book.mask = torch.zeros(B, lay.max_cache_len, dtype=torch.bool, device=valid.device)
        past = lay.get_seq_length()
        slots = torch.arange(n, device=valid.device) + past
        book.mask.index_copy_(1, slots, valid)
        deep = book.mask
        if pos is not None:
            if book.pos is None or book.pos.shape[0] != B:
                book.pos = torch.zeros(B, lay.max_cache_len, dtype=torch.long, device=valid.device)
            book.pos.index_copy_(1, slots, pos.expand(B, -1).to(torch.long))
        if K == 0:
            if book.full_len is None:
                book.full_len = torch.zeros((), dtype=torch.long, device=valid.device)
            book.full_len.add_(S)
        return deep, False  # the unused tail of a static cache is padding
    past = lay.get_seq_length() if lay is not None else 0
    prev = book.mask
    if prev is None:
        prev = valid.new_zeros(B, 0)
    if prev.shape[0] != B:
        raise ValueError(f"vtw: the cache holds {prev.shape[0]} sequences but this forward has {B}")
    if prev.shape[1] > past:  # the cache was cropped or reset since
        prev = prev[:, :past]
    elif prev.shape[1] < past:
        raise ValueError(f"vtw: layer {K}'s cache holds {past} tokens that vtw did not place (was the cache "
                         "filled before vtw.enable?); start from a new cache")
    deep = torch.cat([prev, valid], dim=1)
    book.mask = deep
    if pos is not None:
        prev_pos = book.pos[:, :past] if book.pos is not None else pos.new_zeros(B, 0)
        book.pos = torch.cat([prev_pos, pos.expand(B, -1)], dim=1)
    # A cropped record is a prefix of a dense one: still dense; an empty one is dense.
    book.dense = dense and (past == 0 or book.dense)
    if K == 0:
        full = 0 if book.full_len is None else book.full_len
        book.full_len = full + S
    return deep, book.dense


def _unslide(state: _State, cache) -> None:
    """Sliding-window deep layers: their cache layers evict by slot count, which in the withdrawn
    layout (padding slots after a row's prompt) could drop tokens inside the window of original
    positions. They get a full cache layer instead (the window is applied by the mask)."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    layers = cache.layers
    for i in range(state.layer, min(len(layers), state.num_layers)):
        lay = layers[i]
        if getattr(lay, "is_sliding", False):
            if getattr(lay, "is_initialized", False):
                raise ValueError(f"vtw: layer {i}'s cache was filled before vtw.enable; start from a new cache")
            if isinstance(lay, StaticLayer):
                # the capacity of the cache's full-attention layers (a sliding one keeps only its window)
                cap = next((x.max_cache_len for x in layers if isinstance(x, StaticLayer)
                            and not getattr(x, "is_sliding", False)), None)
                if cap is None:
                    raise NotImplementedError(f"vtw: decoder layer {i} is a sliding-window layer with a static cache "
                                              "that has no full-attention layer to size a full one from")
                layers[i] = StaticLayer(max_cache_len=cap)
            elif isinstance(lay, DynamicLayer):
                layers[i] = DynamicLayer()
            else:
                raise NotImplementedError(
                    f"vtw: decoder layer {i} is a sliding-window layer with a {type(lay).__name__} cache; vtw handles "
                    "sliding-window layers from K on with the dynamic and static caches only")


def _compact_deep_caches(state: _State, cache, wmask: torch.Tensor) -> None:
    """Compact mode, after the last layer of a forward of several tokens: moves the kept tokens
    (text, past and present) of every deep layer's cache to the front of each row, in place, with
    one `compact_kv_` call for all deep layers."""
    K = state.layer
    book = cache._vtw_book
    deep = [lay for lay in cache.layers[K:] if getattr(lay, "keys", None) is not None]
    if not deep:
        return
    lay = deep[0]
    B, S = wmask.shape
    end = lay.get_seq_length()  # this chunk occupies slots end - S .. end - 1
    if _is_static(lay):
        cap = lay.max_cache_len
        slots = torch.arange(cap, device=wmask.device)
        book.mask.index_copy_(1, slots[:S] + (end - S), ~wmask)
        keep = book.mask & (slots < end)[None]
        new_lens = vtw_kernels.compact_kv_([x.keys for x in deep], [x.values for x in deep], ~keep)
        top = new_lens.max().to(torch.long)
        for x in deep:
            x.cumulative_length.copy_(top)  # no host synchronisation
        book.mask.copy_(slots[None] < new_lens[:, None])
        return
    keep = torch.cat([book.mask[:, : end - S], ~wmask], dim=1)
    new_lens = vtw_kernels.compact_kv_([x.keys for x in deep], [x.values for x in deep], ~keep)
    lo, top = torch.stack(torch.aminmax(new_lens)).tolist() if B else (0, 0)  # one host synchronisation, after the layers
    for x in deep:
        x.keys = x.keys[:, :, :top].clone()  # clone: the memory of the withdrawn slots is freed now
        x.values = x.values[:, :, :top].clone()
    book.mask = torch.arange(top, device=wmask.device)[None] < new_lens[:, None]
    book.dense = lo == top


class _VtwCacheMixin:
    """Mixed into a cache class on first use by vtw, so that the cache operations generate()
    performs (beam reordering, batch selection, cropping, reset) keep vtw's record in step."""

    def get_seq_length(self, layer_idx: int = 0):
        book = getattr(self, "_vtw_book", None)
        if book is not None and book.layer == 0 and layer_idx == 0 and book.full_len is not None:
            return book.full_len
        return super().get_seq_length(layer_idx)

    def _rows(self, select) -> None:
        """Applies a batch-row operation of the cache to vtw's per-row record as well."""
        book = getattr(self, "_vtw_book", None)
        if book is not None:
            for name in ("mask", "pos"):
                t = getattr(book, name)
                if t is not None:
                    setattr(book, name, select(t))

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int):
        super().crop(tokens_to_remove)
        book = getattr(self, "_vtw_book", None)
        if book is not None and tokens_to_remove < 0:
            # The cropped tokens are the last ones generated: text, so one slot each in every layer.
            if book.full_len is not None:
                book.full_len = (book.full_len.sub_(-tokens_to_remove) if isinstance(book.full_len, torch.Tensor)
                                 else book.full_len + tokens_to_remove)

    def reset(self):
        super().reset()  # a dynamic cache drops its tensors (vtw's mask is cut to them on next use);
        book = getattr(self, "_vtw_book", None)  # a static one restarts at slot 0 (later slots are masked)
        if book is not None and book.full_len is not None:
            book.full_len = book.full_len.zero_() if isinstance(book.full_len, torch.Tensor) else 0


_ADOPTED: dict = {}


def _adopt(cache) -> None:
    cls = type(cache)
    if issubclass(cls, _VtwCacheMixin):
        return
    new = _ADOPTED.get(cls)
    if new is None:
        new = type(f"Vtw{cls.__name__}", (_VtwCacheMixin, cls), {"__module__": __name__})
        _ADOPTED[cls] = new
    cache.__class__ = new


__all__ = ["MODES", "disable", "enable", "is_enabled"]
