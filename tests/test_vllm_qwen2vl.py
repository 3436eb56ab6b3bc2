"""vtw.vllm on a tiny Qwen2-VL and a tiny Qwen2.5-VL (random weights, built locally; M-RoPE): the engine's greedy
tokens equal those of the withdrawn model recomputed cache-free on the Hugging Face modules at
every step (the deep layers get the text tokens' original [3, N] positions), in a continuously
batched, chunked-prefill, preempting workload mixing image (several sizes) and text-only
requests, for K = 0, 1, L/2, L-1 and L; every KV block is free afterwards."""

import os

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from vtw.vllm import _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 24
PROMPTS = tiny.QWEN_PROMPTS


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def folder(tmp_path_factory, request):
    return tiny.build_qwen2_vl(tmp_path_factory.mktemp(request.param), layers=LAYERS, family=request.param)


@pytest.fixture(scope="module")
def llm(folder):
    from vllm import LLM

    # blocks of 32 tokens, 4 usable: the longest request needs 2-3; chunks of 16 tokens split images
    engine = LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=96,
                 max_num_batched_tokens=16, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=5,
                 limit_mm_per_prompt={"image": 1, "video": 0},
                 enforce_eager=True,  # re-wired to each K between workloads (set_layer)
                 hf_overrides={"vtw_layer": LAYERS // 2, "vtw_kv": "shared"})
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(folder)


class _Stop(Exception):
    pass


@torch.no_grad()
def _lm_inputs(model, inputs):
    """What HF's Qwen2-VL passes its language model: embeddings and the [3, 1, S] M-RoPE positions."""
    got = {}

    def hook(mod, args, kwargs):
        got["e"], got["p"] = kwargs["inputs_embeds"], kwargs["position_ids"]
        raise _Stop

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    pos = got["p"]
    if pos is None:  # a text-only prompt: HF's text model counts positions itself (0..S-1 on every stream)
        pos = torch.arange(got["e"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
    if pos.ndim == 3 and pos.shape[0] == 4:  # text positions first
        pos = pos[1:]
    return got["e"], pos


@torch.no_grad()
def _withdrawn_next(model, embeds, pos, ids, layer):
    """A cache-free forward of the withdrawn model on the HF modules: layers < K on every token,
    layers >= K on the text tokens only, with their original [3, 1, n] positions."""
    lm = model.model.language_model
    h = embeds
    for i in range(layer):
        h = lm.layers[i](h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
    if layer < len(lm.layers):
        keep = (ids != model.config.image_token_id) & (ids != model.config.video_token_id)
        if not keep[-1]:
            return int(model.lm_head(lm.norm(h[:, -1:]))[0, -1].argmax())
        h, pos = h[:, keep], pos[:, :, keep]
        for i in range(layer, len(lm.layers)):
            h = lm.layers[i](h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
    return int(model.lm_head(lm.norm(h[:, -1:]))[0, -1].argmax())


def _reference(hf, layer):
    """Greedy tokens, every step recomputed from scratch. The prompt's embeddings and M-RoPE
    positions are HF's own; a generated token is embedded by the token table and placed at the
    next position on all three streams (one past the largest so far), as HF's decoding does."""
    model, proc = hf
    emb = model.model.language_model.embed_tokens
    out = []
    for text, seed in PROMPTS:
        inputs = dict(proc(text=text, images=tiny.qwen_image(seed) if seed is not None else None,
                           return_tensors="pt"))
        embeds, pos = _lm_inputs(model, inputs)
        ids = inputs["input_ids"][0]
        toks = []
        for _ in range(NEW):
            t = _withdrawn_next(model, embeds, pos, ids, layer)
            toks.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
            with torch.no_grad():
                embeds = torch.cat([embeds, emb(torch.tensor([[t]]))], 1)
            pos = torch.cat([pos, (pos.max() + 1).view(1, 1, 1).expand(3, 1, 1)], 2)
        out.append((inputs["input_ids"][0].tolist(), toks))
    return out


def _runner_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    _runner.set_layer(_runner_of(llm), layer)
    try:
        got, preempted = tiny.run_workload(llm, NEW, PROMPTS, image=tiny.qwen_image,
                                           aborted=(tiny.QWEN_IMAGE + " this one is aborted", 4))
    finally:
        _runner.set_layer(_runner_of(llm), LAYERS // 2)
    want = _reference(hf, layer)
    for (gp, gt), (wp, wt), (text, _) in zip(got, want, PROMPTS):
        assert gp == wp, f"prompt ids differ for {text!r}"
        assert gt == wt, f"K={layer}, {text!r}: vLLM {gt} != reference {wt}"
    assert preempted > 0, "the workload was meant to preempt a request"
    free, total = tiny.free_blocks(llm)
    assert free == total, f"{total - free} KV blocks still held after the workload"


def test_withdrawal_changes_image_requests(hf):
    full, withdrawn = _reference(hf, LAYERS), _reference(hf, 1)
    assert any(a[1] != b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS) if s is not None)
    # a text-only request is untouched unless it generates a visual token id (withdrawn too, as in
    # vtw.enable; random weights do generate them)
    visual = {hf[0].config.image_token_id, hf[0].config.video_token_id}
    assert all(a[1] == b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS)
               if s is None and not visual & set(a[1]))


def test_text_only_tokens_equal_withdrawn_model(folder, hf, llm):
    """A second engine, vtw_kv="text_only" at K = 1 (its own KV groups for the deep layers)."""
    from vllm import LLM

    del llm  # the module engine stays; this one is started after it
    engine = LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=96,
                 max_num_batched_tokens=16, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=4 * 3 + 1,
                 limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides={"vtw_layer": 1})
    try:
        got, preempted = tiny.run_workload(engine, NEW, PROMPTS, image=tiny.qwen_image,
                                           aborted=(tiny.QWEN_IMAGE + " this one is aborted", 4))
        for (gp, gt), (wp, wt) in zip(got, _reference(hf, 1)):
            assert gp == wp
            assert gt == wt, f"text_only, K=1: vLLM {gt} != reference {wt}"
        assert preempted > 0
        compiles, compiled, eager = tiny.step_paths(engine)  # vLLM's compilation on (its default)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(engine)
        assert free == total
    finally:
        del engine
