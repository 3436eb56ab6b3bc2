"""attn_implementation="vtw" in Hugging Face transformers: tiny random-weight models built from
configs (no downloads) give the logits of "eager" and "sdpa" (float32, 1e-5) with and without
padding, and greedy generate() gives the same tokens; the kernels (not the fallback) serve the
causal + padding cases, the exact fallback serves arbitrary masks."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vtw.attention as va  # noqa: E402  (registers "vtw")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function  # noqa: E402

ATOL = 1e-5


def tiny_llama(heads=2, kv_heads=1, head_dim=64, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=256, pad_token_id=0, **extra)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    return model


def variants(model, names=("eager", "sdpa", "vtw")):
    out = {}
    for name in names:
        m = copy.deepcopy(model)
        m.set_attn_implementation(name)
        assert m.config._attn_implementation == name
        out[name] = m
    return out


def batch(lengths, total, left=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, total - n:] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture(autouse=True)
def _reset():
    va.STATS.clear()
    va.BACKEND = None
    yield
    va.BACKEND = None


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def assert_logits_match(models, ids, mask):
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    ref = logits(models["eager"], ids, mask)
    for name, m in models.items():
        if name == "eager":
            continue
        out = logits(m, ids, mask)
        err = (out - ref)[valid].abs().max().item()
        assert err <= ATOL, f"{name}: max |logits - eager| = {err:.3g} at real tokens"


@pytest.mark.parametrize("left", [True, False], ids=["left-padding", "right-padding"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(2, 1, 64), (4, 2, 64), (2, 2, 80), (8, 1, 64)])
def test_prefill_logits_match_eager_and_sdpa(left, heads, kv_heads, head_dim):
    models = variants(tiny_llama(heads, kv_heads, head_dim))
    ids, mask = batch([12, 9, 5, 1], 12, left=left)
    assert_logits_match(models, ids, mask)
    assert va.STATS["varlen"] > 0, va.STATS
    assert not [k for k in va.STATS if k.startswith("fallback")], va.STATS


def test_no_padding_uses_the_causal_kernel_without_a_mask():
    models = variants(tiny_llama())
    ids, _ = batch([10, 10], 10)
    assert_logits_match(models, ids, None)
    assert_logits_match(models, ids, torch.ones_like(ids))
    assert va.STATS["varlen"] > 0 and not [k for k in va.STATS if k.startswith("fallback")], va.STATS


def test_padding_changes_the_result():
    # The comparison above would be vacuous if padding were ignored: check it is not.
    m = variants(tiny_llama(), ("vtw",))["vtw"]
    ids, mask = batch([12, 6], 12)
    masked = logits(m, ids, mask)
    unmasked = logits(m, ids, torch.ones_like(mask))
    assert (masked[1, -1] - unmasked[1, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("left", [True, False], ids=["left-padding", "no-padding"])
def test_greedy_generate_same_tokens(left):
    models = variants(tiny_llama(heads=4, kv_heads=2), ("eager", "vtw"))
    ids, mask = batch([11, 7, 3] if left else [11, 11, 11], 11)
    out = {}
    for name, m in models.items():
        with torch.no_grad():
            out[name] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                   min_new_tokens=10)
    assert torch.equal(out["vtw"], out["eager"])
    assert not [k for k in va.STATS if k.startswith("fallback")], va.STATS
    if left:
        assert va.STATS["varlen"] >= 2 * 10  # prefill and every decode step, 2 layers
    else:
        assert va.STATS["decode"] >= 2 * 9  # the decode steps go to decode_attention


def test_greedy_generate_static_cache():
    # A static cache gives keys past the current length: the mask then marks them, and every
    # row's keys are a prefix of the cache, so decode_attention serves the steps.
    models = variants(tiny_llama(), ("eager", "vtw"))
    ids, mask = batch([9, 9], 9)
    out = {}
    for name, m in models.items():
        with torch.no_grad():
            out[name] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                   do_sample=False, cache_implementation="static")
    assert torch.equal(out["vtw"], out["eager"])
    assert va.STATS["decode"] > 0 and not [k for k in va.STATS if k.startswith("fallback")], va.STATS


def test_triton_backend_through_transformers():
    # The Triton kernels (interpreter on CPU) behind the same integration.
    va.BACKEND = "triton"
    models = variants(tiny_llama(), ("eager", "vtw"))
    ids, mask = batch([7, 4], 7)
    assert_logits_match(models, ids, mask)
    assert va.STATS["varlen"] > 0


def test_arbitrary_mask_falls_back_exactly():
    # A sliding window shorter than the sequence is not causal + padding: the exact fallback.
    models = variants(tiny_llama())
    B, S = 2, 10
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    allowed = (j <= i) & (j > i - 3)
    mask4 = torch.zeros(B, 1, S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ids, _ = batch([S, S], S)
    ref = logits(models["eager"], ids, mask4)
    out = logits(models["vtw"], ids, mask4)
    assert (out - ref).abs().max().item() <= ATOL
    assert any(k.startswith("fallback") for k in va.STATS), va.STATS


def test_grad_mode_uses_the_differentiable_fallback():
    models = variants(tiny_llama(), ("eager", "vtw"))
    ids, mask = batch([8, 5], 8)
    outs = {}
    for name, m in models.items():
        out = m(input_ids=ids, attention_mask=mask).logits
        out[mask.bool()].sum().backward()
        outs[name] = m.model.layers[0].self_attn.q_proj.weight.grad.clone()
    assert (outs["vtw"] - outs["eager"]).abs().max().item() <= 1e-4
    assert any(k.startswith("fallback:inputs require grad") for k in va.STATS), va.STATS


def test_mask_function_returns_none_only_for_plain_causal():
    ones = torch.ones(2, 6, dtype=torch.bool)
    assert va.vtw_mask(2, 6, 6, attention_mask=ones, mask_function=causal_mask_function) is None
    assert va.vtw_mask(2, 1, 6, q_offset=5, attention_mask=ones, mask_function=causal_mask_function) is None
    # Padding, a static cache's unused tail (queries not at the end of the keys), a window.
    pad = ones.clone()
    pad[0, 0] = False
    for kwargs in (dict(q_length=6, kv_length=6, attention_mask=pad),
                   dict(q_length=6, kv_length=10, attention_mask=ones),
                   dict(q_length=6, kv_length=6, attention_mask=ones,
                        mask_function=sliding_window_causal_mask_function(3))):
        kwargs.setdefault("mask_function", causal_mask_function)
        m = va.vtw_mask(2, **kwargs)
        assert m is not None and m.dtype == torch.bool and m.shape[-2:] == (kwargs["q_length"], kwargs["kv_length"])


def test_dense_fallback_matches_eager_formula_with_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 64, generator=g)
    k = torch.randn(2, 2, 7, 64, generator=g)
    v = torch.randn(2, 2, 7, 64, generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    out = va.dense_attention(q, k, v, mask, 0.125)
    kr, vr = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    s = (q.double() @ kr.transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
    exp = (torch.softmax(s, -1) @ vr).transpose(1, 2)
    assert (out.double() - exp).abs().max().item() <= 1e-5
