"""vtw.enable: the four defects of issue 19 on LLaVA-1.5 (tiny random model, float32, CPU), each
checked against the masking-definition reference of test_enable_hf_families.py (the unmodified
model in which no query of a layer >= K attends to a visual key):

- B1: a static cache under torch.compile does not recompile at every decode step (and at
  K = L vtw adds nothing: the compilations are the unmodified model's);
- B2: copy.deepcopy of an enabled model works and is independent of the original;
- B3: gradient checkpointing trains exactly (the gradients equal the reference's), or, on a
  transformers that replays the whole layer call, is refused with a clear error;
- B4: packed sequences (position ids restarting within a row, no attention mask, no cache) keep
  their boundaries in the deep layers.
Plus: code between the deep layers that changes the hidden states is refused at run time.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtw
from vtw.compat.transformers import CHECKPOINT_REPLAYS_CALL
from test_enable_hf_families import STEPS, _masked_forward, _refs, assert_generate_matches
from test_enable_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_enable_support import batch_inputs, gen_kwargs, llava_case


@pytest.fixture(scope="module")
def case():
    c = llava_case("sdpa")
    c.refs = {}
    return c


# ---------------------------------------------------------------------------------------------
# B1


def _compile_counts(case, K, steps):
    """Runs generate with a static cache and the model's forward compiled (backend counting the
    graphs it is given); returns the number of graphs compiled so far after each forward."""
    counts, graphs = [], []

    def backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    model = case.model
    torch._dynamo.reset()
    if K is not None:
        vtw.enable(model, K)
    model.forward = torch.compile(type(model).forward.__get__(model), backend=backend)
    hook = model.register_forward_hook(lambda *a: counts.append(len(graphs)))
    try:
        with torch.no_grad():
            out = model.generate(**batch_inputs(case), **gen_kwargs(case, steps, cache_implementation="static"))
    finally:
        hook.remove()
        del model.forward
        if K is not None:
            vtw.disable(model)
        torch._dynamo.reset()
    return counts, out


def test_static_cache_compiled_does_not_recompile_per_step(case):
    L = len(case.text.layers)
    # At K = L vtw adds nothing to the model: no wrapper, no hook, generate's mask function kept.
    vtw.enable(case.model, L)
    try:
        assert all("forward" not in layer.__dict__ for layer in case.text.layers)
        assert "create_masks_for_generate" not in case.model.__dict__
        assert not case.model.model._forward_pre_hooks and not case.text._forward_pre_hooks
    finally:
        vtw.disable(case.model)
    # The prefill and the first decode steps compile (shapes become dynamic after a change); from
    # then on a decode step compiles again only when the unmodified model's does (here: never, on
    # the torch versions of this project), at K = L and K < L.
    stock, _ = _compile_counts(case, None, 6)
    growth = [n - stock[2] for n in stock[2:]]
    for K in (L, 2):
        counts, out = _compile_counts(case, K, 6)
        assert len(counts) == 6
        assert [n - counts[2] for n in counts[2:]] == growth, f"K={K}: graphs after each forward {counts}, stock {stock}"
    # and the compiled generation is still exact
    inputs = batch_inputs(case)
    refs = [(t[:STEPS], lg[:STEPS]) for t, lg in _refs(case, 2)]
    out.sequences = out.sequences[:, : inputs["input_ids"].shape[1] + STEPS]
    out.logits = out.logits[:STEPS]
    assert_generate_matches(case, 2, out, inputs, refs)


# ---------------------------------------------------------------------------------------------
# B2


def test_deepcopy_of_an_enabled_model_is_independent(case):
    inputs = batch_inputs(case)
    refs = _refs(case, 1)
    vtw.enable(case.model, 1)
    try:
        twin = copy.deepcopy(case.model)
    finally:
        vtw.disable(case.model)
    assert vtw.is_enabled(twin) and not vtw.is_enabled(case.model)
    for layer in twin.model.language_model.layers:
        assert layer.forward.args[2] is layer  # the copy's wrappers act on the copy's layers
    with torch.no_grad():
        out = twin.generate(**inputs, **gen_kwargs(case, STEPS))
    assert_generate_matches(case, 1, out, inputs, refs)
    # The original is untouched (disabled: its output is the unmodified model's) ...
    full = _refs(case, len(case.text.layers))
    with torch.no_grad():
        plain = case.model.generate(**inputs, **gen_kwargs(case, STEPS))
    assert_generate_matches(case, len(case.text.layers), plain, inputs, full)
    # ... and disabling the copy restores the copy only.
    vtw.enable(case.model, 1)
    try:
        vtw.disable(twin)
        assert vtw.is_enabled(case.model)
        with torch.no_grad():
            out2 = case.model.generate(**inputs, **gen_kwargs(case, STEPS))
        assert_generate_matches(case, 1, out2, inputs, refs)
    finally:
        vtw.disable(case.model)


# ---------------------------------------------------------------------------------------------
# B3


def _text_loss(case, logits, ids):
    visual = torch.isin(torch.tensor(ids), torch.tensor(case.visual_ids))
    w = torch.linspace(-1, 1, logits.shape[-1])
    return (logits[~visual] * w).sum()


def test_gradient_checkpointing_trains_exactly_or_is_refused(case):
    model = case.model
    sample = case.samples[1]  # two images, text between them
    K = 2
    model.train()
    try:
        model.zero_grad()
        ref_logits = _masked_forward(case, K, sample.ids, sample.mm, grad=True)
        _text_loss(case, ref_logits, sample.ids).backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert any(n.startswith("model.language_model.layers.3") for n in ref)
        model.zero_grad()
        model.gradient_checkpointing_enable()
        if CHECKPOINT_REPLAYS_CALL:
            with pytest.raises(NotImplementedError, match="gradient checkpointing"):
                vtw.enable(model, K)
            model.gradient_checkpointing_disable()
            vtw.enable(model, K)
            model.gradient_checkpointing_enable()  # switched on after enable: refused at the forward
            with pytest.raises(NotImplementedError, match="gradient checkpointing"):
                model(input_ids=torch.tensor([sample.ids]), **sample.mm, use_cache=False)
            return
        calls = []
        attn = case.text.layers[K].self_attn
        h = attn.register_forward_hook(lambda *a: calls.append(1))
        vtw.enable(model, K)
        try:
            out = model(input_ids=torch.tensor([sample.ids]), **sample.mm, use_cache=False)
            _text_loss(case, out.logits[0], sample.ids).backward()
        finally:
            h.remove()
            vtw.disable(model)
        assert len(calls) == 2  # checkpointing replayed layer K in the backward
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == ref.keys()
        for n in ref:
            # two float32 computations in different orders (and multithreaded reductions): the
            # error is relative to the tensor's largest gradient (a patch embedding's gradient sums
            # over every pixel: 4e-5 off in one of 384 entries was seen on 2 cores); a wrong
            # gradient is off by its own size
            scale = float(ref[n].abs().max())
            torch.testing.assert_close(got[n], ref[n], atol=1e-5 + 1e-4 * scale, rtol=1e-4,
                                       msg=lambda m: f"{n}: {m}")
    finally:
        vtw.disable(model)
        model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()


# ---------------------------------------------------------------------------------------------
# B4


def test_packed_sequences_keep_their_boundaries(case):
    a, b = case.samples[0], case.samples[1]  # one image, then two images
    ids = a.ids + b.ids
    mm = {"pixel_values": torch.cat([a.mm["pixel_values"], b.mm["pixel_values"]])}
    pos = torch.cat([torch.arange(len(a.ids)), torch.arange(len(b.ids))])[None]
    seq = torch.cat([torch.zeros(len(a.ids)), torch.ones(len(b.ids))])
    same = seq[:, None] == seq[None, :]
    text = ~torch.isin(torch.tensor(ids), torch.tensor(case.visual_ids))
    K = 1
    ref = _masked_forward(case, K, ids, mm, extra_mask=same, position_ids=pos)
    crossing = _masked_forward(case, K, ids, mm, position_ids=pos, own_mask=False)  # no boundary from K on
    assert (ref[text] - crossing[text]).abs().max() > 1e-3  # the boundaries matter in the deep layers
    # each packed sequence alone gives the same logits (transformers' definition of packing)
    alone = _masked_forward(case, K, b.ids, b.mm)
    torch.testing.assert_close(ref[len(a.ids):][text[len(a.ids):]], alone[text[len(a.ids):]], atol=1e-4, rtol=1e-5)
    vtw.enable(case.model, K)
    try:
        with torch.no_grad():
            got = case.model(input_ids=torch.tensor([ids]), **mm, position_ids=pos, use_cache=False).logits[0]
    finally:
        vtw.disable(case.model)
    torch.testing.assert_close(got[text], ref[text], atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Code between the deep layers


def test_code_between_deep_layers_is_refused_at_run_time(case):
    # A forward hook on layer 2 that replaces its output stands for code in a model's layer loop
    # (e.g. an unhandled DeepStack): layer 3 would receive hidden states vtw did not produce.
    vtw.enable(case.model, 1)
    hook = case.text.layers[2].register_forward_hook(lambda m, a, out: out + 0)
    try:
        with pytest.raises(RuntimeError, match="changed the hidden states between decoder layers 2 and 3"):
            with torch.no_grad():
                case.model(**batch_inputs(case), use_cache=False)
    finally:
        hook.remove()
        vtw.disable(case.model)
