"""vtw.enable(..., mode="compact"): a forward of several tokens runs the unmodified model, then the
KV caches of layers >= K are compacted in place to their text tokens. Checked against an
independent per-sample reference (unmodified model, caches cut by boolean indexing in the test,
token-by-token decoding), for every family, DynamicCache and StaticCache, follow-up turns."""

from __future__ import annotations

import pytest
import torch

import vtw
from vtw.compat.transformers import cache_kwargs, output_cache
from test_enable_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_enable_support import ATTN, CASES, batch_inputs, gen_kwargs, generated, ref_compact, text_counts

STEPS = 4


# Every attention implementation on LLaVA, SDPA on the other families (the mask building is shared).
PARAMS = [("llava", a) for a in ATTN] + [(f, "sdpa") for f in CASES if f != "llava"]


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    return CASES[request.param[0]](request.param[1])


def _compare(case, out, inputs, refs):
    gen = generated(out, inputs)
    for b, (toks, logits) in enumerate(refs):
        assert gen[b].tolist() == toks, f"{case.name} row {b}: {gen[b].tolist()} vs reference {toks}"
        for t, lg in enumerate(logits):
            torch.testing.assert_close(out.logits[t][b], lg, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("K", [0, 2])
def test_compact_generate_matches_reference(case, K):
    inputs = batch_inputs(case)
    refs = [ref_compact(case, K, s, STEPS) for s in case.samples]
    with torch.no_grad():
        plain = case.model.generate(**inputs, **gen_kwargs(case, 1))
    vtw.enable(case.model, K, mode="compact")
    try:
        with torch.no_grad():
            out = case.model.generate(**inputs, **gen_kwargs(case, STEPS))
    finally:
        vtw.disable(case.model)
    # The first token comes from the unmodified model's prefill, bit for bit.
    assert torch.equal(out.logits[0], plain.logits[0])
    _compare(case, out, inputs, refs)
    # Decode saw text-only caches in layers >= K, and they are that short.
    S = inputs["input_ids"].shape[1]
    lens = [lay.keys.shape[2] for lay in output_cache(out).layers]
    assert lens[:K] == [S + STEPS - 1] * K
    assert lens[K:] == [max(text_counts(case)) + STEPS - 1] * (len(lens) - K)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compact_differs_from_withdraw_after_the_first_token(family):
    # Not vacuous: compact keeps the deep layers' view of the image in the text tokens' KV, withdraw does not.
    case = CASES[family]("sdpa")
    inputs = batch_inputs(case)
    outs = {}
    for mode in ("withdraw", "compact"):
        vtw.enable(case.model, 1, mode=mode)
        try:
            with torch.no_grad():
                outs[mode] = case.model.generate(**inputs, **gen_kwargs(case, 2))
        finally:
            vtw.disable(case.model)
    assert not torch.allclose(outs["withdraw"].logits[0], outs["compact"].logits[0], atol=1e-3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compact_static_cache(family):
    case = CASES[family]("sdpa")
    inputs = batch_inputs(case)
    refs = [ref_compact(case, 2, s, STEPS) for s in case.samples]
    vtw.enable(case.model, 2, mode="compact")
    try:
        with torch.no_grad():
            out = case.model.generate(**inputs, **gen_kwargs(case, STEPS, cache_implementation="static"))
    finally:
        vtw.disable(case.model)
    _compare(case, out, inputs, refs)
    lens = [int(lay.get_seq_length()) for lay in output_cache(out).layers]
    S = inputs["input_ids"].shape[1]
    assert lens[0] - lens[2] == S - max(text_counts(case))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compact_follow_up_turn(family):
    case = CASES[family]("sdpa")
    inputs = batch_inputs(case)
    new = [21, 22, 23]
    vtw.enable(case.model, 2, mode="compact")
    try:
        with torch.no_grad():
            out1 = case.model.generate(**inputs, **gen_kwargs(case, 3))
            gen1 = generated(out1, inputs)
            ids2 = torch.cat([out1.sequences, torch.tensor([new] * len(case.samples))], dim=1)
            extra = torch.ones(len(case.samples), 3 + len(new), dtype=torch.long)
            am2 = torch.cat([inputs["attention_mask"], extra], dim=1)
            out2 = case.model.generate(input_ids=ids2, attention_mask=am2, **cache_kwargs(output_cache(out1)), **gen_kwargs(case, 3))
    finally:
        vtw.disable(case.model)
    gen2 = out2.sequences[:, ids2.shape[1]:]
    for b, s in enumerate(case.samples):
        toks, logits = ref_compact(case, 2, s, 3, follow=new, turn2=3)
        assert gen1[b].tolist() + gen2[b].tolist() == toks
        for t in range(3):
            torch.testing.assert_close(out2.logits[t][b], logits[3 + t], atol=1e-4, rtol=1e-5)
