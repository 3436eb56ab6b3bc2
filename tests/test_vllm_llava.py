"""vtw.vllm on a tiny LLaVA-1.5 (random weights, built locally): the engine's greedy tokens equal
those of the withdrawn model on the same weights, recomputed independently and cache-free on the
Hugging Face modules at every step, in a continuously batched, chunked-prefill workload that mixes image and
text-only requests, for K = 0, 1, L/2, L-1 and L; every KV block is free afterwards.

One in-process engine for the module (engine start is the expensive part): it is started with
vtw_layer = L/2 through hf_overrides, and re-wired to the other K values between workloads.
"""

import os

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from vtw.vllm import _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 24
PROMPTS = tiny.PROMPTS
_image = tiny.image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava(tmp_path_factory.mktemp("tiny_llava"), layers=LAYERS)


@pytest.fixture(scope="module")
def llm(folder):
    from vllm import LLM

    # blocks of 32 tokens, 6 of them (a 90-token request needs 3): requests get preempted;
    # prefill chunks of 32 tokens split every image (64 tokens) and leave chunks without text
    engine = LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=160,
                 max_num_batched_tokens=32, max_num_seqs=4, seed=0, enable_prefix_caching=True,
                 block_size=32, num_gpu_blocks_override=7,
                 # re-wired to each K between workloads (set_layer), which needs an eager engine;
                 # vLLM's compilation with withdrawal: test_vllm_text_only, test_vllm_prefix, ...
                 enforce_eager=True, hf_overrides={"vtw_layer": LAYERS // 2, "vtw_kv": "shared"})
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(folder)


def _runner_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def _embeds(model, inputs):
    """The language model's input embeddings (image features scattered in), as HF computes them."""
    got = {}

    def hook(mod, args, kwargs):
        got["e"] = kwargs["inputs_embeds"]
        raise _Stop

    h = model.model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    return got["e"]


class _Stop(Exception):
    pass


@torch.no_grad()
def _withdrawn_logits(model, embeds, ids, layer):
    """A cache-free forward of the withdrawn model (the paper's algorithm, written out on the HF
    modules): layers < K on every token, layers >= K on the text tokens only (original
    positions); the last position's logits (the early-exit value if it is visual)."""
    lm = model.model.get_decoder()  # language_model (LLaVA, Mistral 3), text_model (Idefics3, SmolVLM)
    S = embeds.shape[1]
    pos = torch.arange(S)[None]
    h = embeds
    for i in range(layer):
        h = lm.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
    keep = ids[0] != model.config.image_token_id
    if layer < len(lm.layers) and not keep[-1]:
        return model.lm_head(lm.norm(h[:, -1:]))[0, -1]
    if layer < len(lm.layers):
        h, pos = h[:, keep], pos[:, keep]
        for i in range(layer, len(lm.layers)):
            h = lm.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
    return model.lm_head(lm.norm(h[:, -1:]))[0, -1]


def _reference(hf, layer, prompts=PROMPTS, new_tokens=NEW, image=_image):
    """Greedy tokens of the withdrawn model, recomputed from scratch at every step (LLaVA-1.5 and
    LLaVA-NeXT: `image` makes each prompt's picture from its seed)."""
    model, proc = hf
    out = []
    for text, seed in prompts:
        inputs = proc(text=text, images=image(seed) if seed is not None else None, return_tensors="pt")
        ids = inputs["input_ids"]
        with torch.no_grad():
            embeds = _embeds(model, inputs)
        toks = []
        for _ in range(new_tokens):
            t = int(_withdrawn_logits(model, embeds, ids, layer).argmax())
            toks.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
            with torch.no_grad():
                embeds = torch.cat([embeds, model.model.get_decoder().embed_tokens(torch.tensor([[t]]))], 1)
        out.append((inputs["input_ids"][0].tolist(), toks))
    return out


def _run(llm):
    return tiny.run_workload(llm, NEW)


_free_blocks = tiny.free_blocks


def test_engine_start_adjustments(llm):
    vc = llm.llm_engine.vllm_config
    assert vc.cache_config.enable_prefix_caching is True  # stays on (hits capped: test_vllm_prefix)
    assert vc.model_config.enforce_eager is True  # asked for by this module (set_layer)
    st = _runner.state_of(_runner_of(llm))
    assert st is not None and st.settings.layer == LAYERS // 2
    # the runner in use is the one this process asked for (tests/test_vllm_mrv2.py runs this module
    # under Model Runner V2), and vtw is wired into it
    mrv2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
    runner = _runner_of(llm)
    assert type(runner).__module__ == ("vllm.v1.worker.cpu.model_runner" if mrv2 else "vllm.v1.worker.cpu_model_runner")
    assert ("Model Runner V2" in st.runner_name) == mrv2, st.runner_name
    if mrv2:
        assert type(runner.model_state).__name__ == "VtwDefaultModelState"


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_hf_model(llm, hf, layer):
    _runner.set_layer(_runner_of(llm), layer)
    try:
        got, preempted = _run(llm)
        st = _runner.state_of(_runner_of(llm))
    finally:
        _runner.set_layer(_runner_of(llm), LAYERS // 2)
    want = _reference(hf, layer)
    for (gp, gt), (wp, wt), (text, _) in zip(got, want, PROMPTS):
        assert gp == wp, f"prompt ids differ for {text!r}"
        assert gt == wt, f"K={layer}, {text!r}: vLLM {gt} != HF vtw.enable {wt}"
    assert preempted > 0, f"the workload was meant to preempt a request ({_free_blocks(llm)} blocks)"
    free, total = _free_blocks(llm)
    assert free == total, f"{total - free} KV blocks still held after the workload"
    # the per-step figure: the deep layers ran on fewer tokens than were scheduled (every image's
    # 64 tokens are withdrawn), in every step that had a text token
    if layer < LAYERS:
        scheduled = sum(len(p) + len(t) - 1 for p, t in got)  # at least, without recompute
        assert st is not None and st.steps > 0 and 0 < st.deep_tokens_total < scheduled, \
            (st and st.deep_tokens_total, scheduled)
        assert st.deep_tokens_total >= sum(sum(1 for i in p if i != hf[0].config.image_token_id) for p, _ in got)
    else:
        assert st is None  # K = L: the layers run stock


def test_withdrawal_changes_image_requests(hf):
    """The comparison above is not vacuous: withdrawal at K = 1 changes some image request's
    tokens on this model (and never a text-only one's)."""
    full = _reference(hf, LAYERS)
    withdrawn = _reference(hf, 1)
    changed = [(a[1] != b[1]) for a, b in zip(full, withdrawn)]
    assert any(c for c, (_, s) in zip(changed, PROMPTS) if s is not None)
    assert not any(c for c, (_, s) in zip(changed, PROMPTS) if s is None)
