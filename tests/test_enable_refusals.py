"""vtw.enable refuses, with one error naming the model class and the reason, every model it cannot
prove exact (issue 19: "never silently wrong"). Tiny random models built from configs; nothing
runs but the constructor and vtw.enable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vtw
from test_enable_support import llava_case, one_thread  # noqa: F401  (autouse: one intra-op thread)


def _text(**kw):
    d = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d.update(kw)
    return d


def _vision(**kw):
    d = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
             patch_size=2)
    d.update(kw)
    return d


def _mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration(MllamaConfig(
        vision_config=_vision(num_global_layers=1, intermediate_layers_indices=[0], vision_output_dim=64,
                              max_num_tiles=4),
        text_config=_text(cross_attention_layers=[1, 3])))


def _llama4():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration(Llama4Config(
        vision_config=_vision(vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
        text_config=_text(intermediate_size_mlp=64, num_local_experts=2)))


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=_vision(), mm_tokens_per_image=4, image_token_index=63,
        text_config=_text(sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2)))


@pytest.mark.parametrize("build, cls, reason", [
    (_mllama, "MllamaForConditionalGeneration", "cross-attention"),
    (_llama4, "Llama4ForConditionalGeneration", "chunked-attention"),
], ids=["mllama", "llama4"])
def test_family_is_refused_with_its_reason(build, cls, reason):
    torch.manual_seed(0)
    model = build()
    for K in (0, 1):
        with pytest.raises(NotImplementedError, match=rf"^vtw.enable: {cls} is not supported: .*{reason}"):
            vtw.enable(model, K)
        assert not vtw.is_enabled(model)
    assert "forward" not in model.__dict__


def test_sliding_window_layers_from_K_on_are_refused_in_compact_mode():
    # (In mode="withdraw" they are supported: test_enable_hf_families.py.)
    torch.manual_seed(0)
    model = _gemma3()
    for K in (0, 1, 2):
        with pytest.raises(NotImplementedError, match=r"Gemma3ForConditionalGeneration is not supported at "
                                                      rf"layer={K}: decoder layer {K + K % 2} of Gemma3TextModel is "
                                                      r"'sliding_attention' .*mode='withdraw' only.*; layer must be >= 3"):
            vtw.enable(model, K, mode="compact")
        assert not vtw.is_enabled(model)
    vtw.enable(model, 3, mode="compact")
    vtw.disable(model)


class _Extra(nn.Module):
    """A decoder layer that takes a per-token argument vtw does not know."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, token_router_ids=None,
                **kwargs):
        return hidden_states


def test_layer_with_an_unknown_argument_is_refused_from_K_on():
    case = llava_case("sdpa")
    layers = case.text.layers
    original = layers[3]
    layers[3] = _Extra()
    try:
        with pytest.raises(NotImplementedError, match=r"LlavaForConditionalGeneration is not supported at layer=2: "
                                                      r"decoder layer 3 \(_Extra\) takes token_router_ids"):
            vtw.enable(case.model, 2)
        vtw.enable(case.model, 4)  # layer == L: every layer runs unchanged
        vtw.disable(case.model)
    finally:
        layers[3] = original


def test_bidirectional_text_decoder_is_refused():
    case = llava_case("sdpa")
    case.text.config.use_bidirectional_attention = True
    with pytest.raises(NotImplementedError, match="attends bidirectionally"):
        vtw.enable(case.model, 1)


def test_per_token_argument_given_to_the_layers_is_refused_at_run_time():
    # A [B, S] tensor reaching the deep layers through **kwargs (as ERNIE-4.5-VL's routing ids
    # would) cannot be carried to the withdrawn layout: refused before layer K runs.
    from test_enable_support import batch_inputs

    case = llava_case("sdpa")
    inputs = batch_inputs(case)
    vtw.enable(case.model, 1)
    try:
        with pytest.raises(NotImplementedError, match=r"decoder layer 1 of LlamaModel received 'routing_ids', a "
                                                      r"per-token \[B, S, ...\] tensor"):
            with torch.no_grad():
                case.model(**inputs, routing_ids=torch.zeros_like(inputs["input_ids"]), use_cache=False)
    finally:
        vtw.disable(case.model)
