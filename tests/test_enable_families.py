"""vtw.enable on LLaVA-NeXT, LLaVA-OneVision, Video-LLaVA, Qwen2-VL and Qwen2.5-VL (tiny random
models, float32, CPU): the family-independent tests of test_enable_llava.py run here on each
family (batched generate vs the independent per-sample reference, layer == L and disable
bit-exact, deep caches text-only, follow-up turns), plus what is particular to a family."""

from __future__ import annotations

import pytest
import torch

import vtw
import test_enable_llava as llava_tests
from test_enable_llava import (  # noqa: F401  (collected here with this module's fixtures)
    test_disable_restores_the_model_exactly,
    test_follow_up_turn_appends_to_the_cache,
    test_layer_equal_to_num_layers_reproduces_the_model,
    test_reference_is_not_vacuous,
    test_sampling_generate_matches_reference,
)
from test_enable_support import enabled, one_thread  # noqa: F401  (fixtures: enable on `case`, one intra-op thread)
from test_enable_support import ATTN, CASES, prepare

FAMILIES = [f for f in CASES if f != "llava"]


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    family, attn = request.param
    c = CASES[family](attn)
    c.preps = [prepare(c, s) for s in c.samples]
    return c


# Fewer layers K than on LLaVA (test_enable_llava.py runs every K), to keep the suite short.
@pytest.mark.parametrize("K", [0, 2])
def test_greedy_generate_matches_reference(case, enabled, K):
    llava_tests.test_greedy_generate_matches_reference(case, enabled, K)


def test_static_cache_generate_matches_reference(case, enabled):
    llava_tests.test_static_cache_generate_matches_reference(case, enabled, 2)


def test_deep_caches_hold_text_tokens_only(case, enabled):
    llava_tests.test_deep_caches_hold_text_tokens_only(case, enabled, 1)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_image_newline_features_sit_on_image_tokens(family):
    # AnyRes models append one image-newline feature per row of tiles: the processor counts those
    # as image tokens, so they are withdrawn with the rest of the image.
    c = CASES[family]("sdpa")
    newline = c.model.model.image_newline.detach()
    for s in c.samples:
        prep = prepare(c, s)
        is_newline = (prep.embeds == newline).all(-1)
        if prep.visual.any():
            assert is_newline.sum() >= 1
        assert not (is_newline & ~prep.visual).any()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_are_three_distinct_streams(family):
    # The reference gives the text decoder the 3-D M-RoPE positions of get_rope_index; the tests
    # above only prove something about them if the three streams differ and the text after an
    # image does not continue at its index (so any renumbering would show).
    c = CASES[family]("sdpa")
    prep = prepare(c, c.samples[0])
    pos = prep.positions
    assert pos.shape[0] == 3 and not torch.equal(pos[1], pos[2])
    text_pos = pos[0][~prep.visual]
    assert not torch.equal(text_pos, torch.arange(len(text_pos)))
    assert not torch.equal(pos[0], torch.arange(pos.shape[1]))
