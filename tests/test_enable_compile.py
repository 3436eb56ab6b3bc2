"""vtw.enable under torch.compile: the text decoder's forward (decoder loop included) traces as one
graph (fullgraph=True) for a prefill with num_keep given and for a StaticCache decode step, and
gives the eager results; the whole multimodal model's decode step has no graph break."""

from __future__ import annotations

import copy

import pytest
import torch

import vtw
from vtw.compat.transformers import cache_kwargs
from test_enable_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_enable_support import CASES, batch_inputs


def _text_inputs(case):
    """What the outer model hands the text decoder, captured from an eager forward."""
    got = {}
    h = case.text.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    with torch.no_grad():
        case.model(**batch_inputs(case), use_cache=False)
    h.remove()
    return got


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_text_forward_compiles_fullgraph_with_num_keep_given(family):
    from transformers import StaticCache

    case = CASES[family]("sdpa")
    inputs = batch_inputs(case)
    got = _text_inputs(case)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    B, S = ids.shape
    embeds = got["inputs_embeds"]
    pos = got["position_ids"] if case.mrope else (am.cumsum(-1) - 1).clamp(min=0)
    withdraw = torch.isin(ids, torch.tensor(case.visual_ids)) | (am == 0)
    vtw.enable(case.model, 2)
    try:
        text = case.text
        cache_e = StaticCache(config=case.model.config, max_cache_len=S + 4)
        cache_c = copy.deepcopy(cache_e)
        compiled = torch.compile(text.forward, fullgraph=True, backend="eager")
        num_keep = int((~withdraw).sum(1).max())  # known on the host: the deep layers run on text slots only
        kw = dict(attention_mask=am, position_ids=pos, use_cache=True, vtw_withdraw_mask=withdraw,
                  vtw_num_keep=num_keep)
        with torch.no_grad():
            eager = text.forward(inputs_embeds=embeds, **cache_kwargs(cache_e), **kw).last_hidden_state
            comp = compiled(inputs_embeds=embeds, **cache_kwargs(cache_c), **kw).last_hidden_state
        real = am.bool()
        torch.testing.assert_close(comp[real], eager[real], atol=1e-5, rtol=1e-5)
        # Text positions must hold the withdrawn model's states, not the unmodified ones.
        vtw.disable(case.model)
        with torch.no_grad():
            plain = text.forward(inputs_embeds=embeds, attention_mask=am, position_ids=pos).last_hidden_state
        vtw.enable(case.model, 2)
        assert (plain[real] - eager[real]).abs().max() > 1e-3
        # One decode step on the static caches the two prefills left.
        tok = torch.arange(B)[:, None] + 5
        e1 = text.embed_tokens(tok)
        am1 = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
        p1 = pos[..., -1:] + 1
        kw1 = dict(attention_mask=am1, position_ids=p1, use_cache=True,
                   vtw_withdraw_mask=torch.zeros(B, 1, dtype=torch.bool), vtw_num_keep=1)
        with torch.no_grad():
            eager1 = text.forward(inputs_embeds=e1, **cache_kwargs(cache_e), **kw1).last_hidden_state
            comp1 = compiled(inputs_embeds=e1, **cache_kwargs(cache_c), **kw1).last_hidden_state
        torch.testing.assert_close(comp1, eager1, atol=1e-5, rtol=1e-5)
        assert [int(x.get_seq_length()) for x in cache_c.layers] == [S + 1] * 2 + [num_keep + 1] * 2
    finally:
        vtw.disable(case.model)
        torch._dynamo.reset()


def test_whole_model_decode_step_has_no_graph_break():
    from transformers import StaticCache

    case = CASES["llava"]("sdpa")
    inputs = batch_inputs(case)
    am = inputs["attention_mask"]
    B, S = am.shape
    vtw.enable(case.model, 2)
    try:
        cache = StaticCache(config=case.model.config, max_cache_len=S + 4)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = case.model(**inputs, position_ids=pos, **cache_kwargs(cache), use_cache=True)
            step = dict(input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
                        attention_mask=torch.cat([am, torch.ones_like(am[:, :1])], dim=1),
                        position_ids=pos[:, -1:] + 1, **cache_kwargs(cache), use_cache=True)
            torch._dynamo.reset()
            explain = torch._dynamo.explain(case.model.forward)(**step)
        assert explain.graph_break_count == 0, [b.reason for b in explain.break_reasons]
        assert explain.graph_count == 1
    finally:
        vtw.disable(case.model)
        torch._dynamo.reset()
