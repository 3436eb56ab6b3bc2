"""vtw.enable / vtw.disable on LLaVA-1.5 (tiny random-weight model, float32, CPU): batched generate
equals the independent per-sample reference of the paper's algorithm; layer == L and disable
reproduce the model bit-exactly; deep caches hold text only; follow-up turns; errors."""

from __future__ import annotations

import pytest
import torch

import vtw
from vtw.compat.transformers import cache_kwargs, output_cache
from test_enable_support import enabled, one_thread  # noqa: F401  (fixtures: enable on `case`, one intra-op thread)
from test_enable_support import (
    ATTN,
    assert_matches_reference,
    batch_inputs,
    gen_kwargs,
    generated,
    llava_case,
    prepare,
    ref_greedy,
    ref_last_logits,
    text_counts,
)

STEPS = 4


@pytest.fixture(scope="module", params=ATTN)
def case(request):
    c = llava_case(request.param)
    c.preps = [prepare(c, s) for s in c.samples]
    return c


def test_reference_is_not_vacuous(case):
    # Withdrawal must change the logits of the samples with images, or the tests below prove nothing.
    L = len(case.text.layers)
    for prep in case.preps:
        full = ref_last_logits(case, L, prep)
        cut = ref_last_logits(case, 1, prep)
        if prep.visual.any():
            assert (full - cut).abs().max() > 1e-2
        else:
            torch.testing.assert_close(full, cut, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [0, 1, 2, 3])
def test_greedy_generate_matches_reference(case, enabled, K):
    inputs = batch_inputs(case)
    enabled(K)
    with torch.no_grad():
        out = case.model.generate(**inputs, **gen_kwargs(case, STEPS))
    assert_matches_reference(case, K, out, inputs, case.preps, greedy=True)


def test_sampling_generate_matches_reference(case, enabled):
    inputs = batch_inputs(case)
    enabled(2)
    torch.manual_seed(123)
    with torch.no_grad():
        out = case.model.generate(**inputs, **gen_kwargs(case, STEPS, do_sample=True, top_k=0, temperature=1.0))
    assert_matches_reference(case, 2, out, inputs, case.preps, greedy=False)


@pytest.mark.parametrize("K", [0, 2])
def test_static_cache_generate_matches_reference(case, enabled, K):
    from transformers import StaticCache

    inputs = batch_inputs(case)
    enabled(K)
    with torch.no_grad():
        out = case.model.generate(**inputs, **gen_kwargs(case, STEPS, cache_implementation="static"))
    assert isinstance(output_cache(out), StaticCache)
    assert_matches_reference(case, K, out, inputs, case.preps, greedy=True)
    # Deep layers wrote text slots only (a static cache keeps its full capacity in every layer).
    S = inputs["input_ids"].shape[1]
    lens = [int(lay.get_seq_length()) for lay in output_cache(out).layers]
    assert len(set(lens[K:])) == 1
    if K:
        assert len(set(lens[:K])) == 1 and lens[0] - lens[K] == S - max(text_counts(case))


def _run(model, inputs, steps=STEPS, **kw):
    with torch.no_grad():
        out = model.generate(**inputs, **gen_kwargs(kw.pop("case"), steps, **kw))
        logits = model(**inputs).logits
    return out, logits


def _assert_same(a, b):
    (out_a, logits_a), (out_b, logits_b) = a, b
    assert torch.equal(out_a.sequences, out_b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(out_a.logits, out_b.logits))
    assert torch.equal(logits_a, logits_b)


def test_layer_equal_to_num_layers_reproduces_the_model(case, enabled):
    inputs = batch_inputs(case)
    plain = _run(case.model, inputs, case=case)
    enabled(len(case.text.layers))
    _assert_same(plain, _run(case.model, inputs, case=case))


def _patch_state(model):
    mods = list(model.modules())
    return ([sorted(m.__dict__.keys()) for m in mods],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods])


def test_disable_restores_the_model_exactly(case):
    inputs = batch_inputs(case)
    before_state = _patch_state(case.model)
    params = {k: v.clone() for k, v in case.model.state_dict().items()}
    plain = _run(case.model, inputs, case=case)
    vtw.enable(case.model, 1)
    assert vtw.is_enabled(case.model)
    withdrawn = _run(case.model, inputs, case=case)
    assert not torch.equal(withdrawn[1], plain[1])
    assert vtw.disable(case.model) is case.model
    assert not vtw.is_enabled(case.model)
    assert _patch_state(case.model) == before_state
    assert all(torch.equal(v, params[k]) for k, v in case.model.state_dict().items())
    _assert_same(plain, _run(case.model, inputs, case=case))
    vtw.disable(case.model)  # disabling twice is harmless


def test_enable_twice_replaces_the_layer(case, enabled):
    inputs = batch_inputs(case)
    enabled(1)
    enabled(2)
    with torch.no_grad():
        out = case.model.generate(**inputs, **gen_kwargs(case, 2))
    assert_matches_reference(case, 2, out, inputs, case.preps, greedy=True)


@pytest.mark.parametrize("K", [1, 3])
def test_deep_caches_hold_text_tokens_only(case, enabled, K):
    inputs = batch_inputs(case)
    S = inputs["input_ids"].shape[1]
    enabled(K)
    with torch.no_grad():
        out = case.model.generate(**inputs, **gen_kwargs(case, STEPS))
    texts = text_counts(case)
    for i, lay in enumerate(output_cache(out).layers):
        want = S + STEPS - 1 if i < K else max(texts) + STEPS - 1
        assert lay.keys.shape[2] == want and lay.values.shape[2] == want, (i, lay.keys.shape)


def test_deep_cache_contents_are_the_text_tokens(case, enabled):
    # Row b's text tokens fill slots 0 .. n_b - 1 of the deep caches, in order: compare layer K's
    # cached keys with the reference's (layer K's input, normed, projected, rotated) at the text positions.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    K = 2
    inputs = batch_inputs(case)
    enabled(K)
    with torch.no_grad():
        out = case.model.generate(**inputs, **gen_kwargs(case, 2))
    cached = output_cache(out).layers[K].keys
    text = case.text
    layer = text.layers[K]
    with torch.no_grad():
        for b, (prep, n) in enumerate(zip(case.preps, text_counts(case))):
            h = prep.embeds[None]
            pos = prep.positions[None]
            cos, sin = text.rotary_emb(h, pos)
            mask = torch.full((h.shape[1],) * 2, torch.finfo(h.dtype).min).triu(1)[None, None]
            for lay in text.layers[:K]:
                h = type(lay).forward(lay, h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
            keep = ~prep.visual
            x = layer.input_layernorm(h[:, keep])
            att = layer.self_attn
            k = att.k_proj(x).view(1, x.shape[1], -1, att.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos[:, keep], sin[:, keep])
            torch.testing.assert_close(cached[b, :, :n], k[0], atol=1e-5, rtol=1e-5)


def test_follow_up_turn_appends_to_the_cache(case, enabled):
    K = 2
    inputs = batch_inputs(case)
    enabled(K)
    with torch.no_grad():
        out1 = case.model.generate(**inputs, **gen_kwargs(case, 3))
    gen1 = generated(out1, inputs)
    new = torch.tensor([[21, 22, 23]]).expand(len(case.samples), -1)
    ids2 = torch.cat([out1.sequences, new], dim=1)
    am2 = torch.cat([inputs["attention_mask"], torch.ones_like(gen1), torch.ones_like(new)], dim=1)
    with torch.no_grad():
        out2 = case.model.generate(input_ids=ids2, attention_mask=am2, **cache_kwargs(output_cache(out1)), **gen_kwargs(case, 3))
    gen2 = out2.sequences[:, ids2.shape[1]:]
    from test_enable_support import _extend

    for b, prep in enumerate(case.preps):
        ext = _extend(case, prep, gen1[b].tolist() + [21, 22, 23])
        toks, logits = ref_greedy(case, K, ext, 3)
        assert gen2[b].tolist() == toks
        for t in range(3):
            torch.testing.assert_close(out2.logits[t][b], logits[t], atol=1e-4, rtol=1e-5)
    # Deep layers grew by the new text only.
    S = inputs["input_ids"].shape[1]
    assert output_cache(out2).layers[0].keys.shape[2] == S + 3 + 3 + 2
    assert output_cache(out2).layers[K].keys.shape[2] == max(text_counts(case)) + 3 + 3 + 2


def test_visual_mask_callable(case, enabled):
    inputs = batch_inputs(case)
    seen = {}

    def by_token(inp):
        seen.update(inp)
        return inp["input_ids"] == 63

    enabled(1)
    with torch.no_grad():
        default = case.model(**inputs).logits
    enabled(1, visual_mask=by_token)
    with torch.no_grad():
        custom = case.model(**inputs).logits
    assert torch.equal(default, custom)
    assert "pixel_values" in seen and torch.equal(seen["input_ids"], inputs["input_ids"])
    # Withdrawing nothing (only padding leaves the deep layers) gives the model's logits.
    vtw.disable(case.model)
    with torch.no_grad():
        plain = case.model(**inputs).logits
    enabled(1, visual_mask=lambda inp: torch.zeros_like(inp["input_ids"], dtype=torch.bool))
    with torch.no_grad():
        nothing = case.model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(nothing[real], plain[real], atol=1e-5, rtol=1e-5)


def test_generated_visual_token_ids_do_not_break_generate(case, enabled):
    # A random model may generate the image token id; vtw withdraws it like any visual token.
    inputs = batch_inputs(case)
    enabled(2)
    kw = gen_kwargs(case, 6)
    kw["suppress_tokens"] = None
    with torch.no_grad():
        out = case.model.generate(**inputs, **kw)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 6


# ---------------------------------------------------------------------------------------------
# Errors


def test_layer_out_of_range(case):
    L = len(case.text.layers)
    for bad in (-1, L + 1):
        with pytest.raises(ValueError, match=rf"layer must be in \[0, {L}\].*got {bad}"):
            vtw.enable(case.model, bad)
    with pytest.raises(TypeError, match="layer must be an int"):
        vtw.enable(case.model, 1.5)
    with pytest.raises(TypeError, match="layer must be an int"):
        vtw.enable(case.model, True)
    assert not vtw.is_enabled(case.model)


def test_unwireable_model_names_the_class_and_the_need():
    class Blob(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(TypeError, match=r"cannot wire Blob.*\.layers"):
        vtw.enable(Blob(), 0)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        vtw.enable("llava", 0)


def test_bad_visual_mask(case, enabled):
    inputs = batch_inputs(case)
    with pytest.raises(TypeError, match="visual_mask must be a callable"):
        vtw.enable(case.model, 1, visual_mask=torch.zeros(2, 3, dtype=torch.bool))
    enabled(1, visual_mask=lambda inp: torch.zeros(inp["input_ids"].shape[0], 3, dtype=torch.bool))
    B, S = inputs["input_ids"].shape
    with pytest.raises(ValueError, match=rf"visual_mask returned a mask of shape \({B}, 3\).*\[{B}, {S}\]"):
        case.model(**inputs)
    enabled(1, visual_mask=lambda inp: torch.zeros_like(inp["input_ids"]))
    with pytest.raises(TypeError, match="bool tensor"):
        case.model(**inputs)


def test_bad_mode_and_missing_token_ids(case):
    with pytest.raises(ValueError, match="mode must be one of"):
        vtw.enable(case.model, 1, mode="fast")
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="no image/video token id.*visual_mask="):
        vtw.enable(lm, 1)
    vtw.enable(lm, 1, visual_mask=lambda inp: inp["input_ids"] == 5)  # text-only decoders work with a callable
    vtw.disable(lm)


def test_beam_search_scores_match_reference():
    # Beam search reorders the caches every step; each returned beam's score (length_penalty 0: the
    # sum of its tokens' log-probabilities) must be the reference's for that token sequence.
    from test_enable_support import CASES, ref_forced

    case = CASES["llava"]("sdpa")
    # Rows with one picture each (of different lengths, so one is left-padded): transformers
    # 5.17 expands pixel_values per picture, not per row, for beam search, so a row with two
    # pictures or none gives other beams' pictures to its own, with or without vtw (see
    # vtw.compat.transformers); one picture per row is expanded the same way by every release.
    samples = [s for s in case.samples if s.mm.get("pixel_values") is not None and len(s.mm["pixel_values"]) == 1]
    assert len(samples) >= 2 and len({len(s.ids) for s in samples}) > 1
    preps = [prepare(case, s) for s in samples]
    inputs = batch_inputs(case, samples)
    vtw.enable(case.model, 2)
    try:
        with torch.no_grad():
            out = case.model.generate(**inputs, **gen_kwargs(case, STEPS, num_beams=3, num_return_sequences=2,
                                                             length_penalty=0.0, output_scores=True))
    finally:
        vtw.disable(case.model)
    gen = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert gen.shape[0] == 2 * len(preps)
    for i in range(gen.shape[0]):
        toks = gen[i].tolist()
        logits = ref_forced(case, 2, preps[i // 2], toks)
        score = sum(torch.log_softmax(lg.double(), -1)[t] for lg, t in zip(logits, toks))
        torch.testing.assert_close(out.sequences_scores[i].double(), score, atol=1e-4, rtol=1e-5)
    assert any(not torch.equal(gen[2 * b], gen[2 * b + 1]) for b in range(len(preps)))
