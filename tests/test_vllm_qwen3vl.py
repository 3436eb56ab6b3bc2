"""vtw.vllm on a tiny Qwen3-VL and a tiny Qwen3-VL-MoE (random weights, built locally; interleaved M-RoPE;
DeepStack: vision features added to the visual positions after decoder layers 0 and 1): the engine's
greedy tokens equal those of the withdrawn model recomputed cache-free on the Hugging Face modules at
every step (layers < K on every token, with DeepStack after each of them; layers >= K on the text
tokens only, with their original [3, N] positions, no DeepStack: the positions it writes to are
withdrawn), in a continuously batched, chunked-prefill (images split across chunks), preempting
workload with an abort and text-only requests, for K = 0, 1 (inside the DeepStack layers), L/2, L-1
and L; every KV block is free afterwards.

vLLM's Qwen3LLMModel adds DeepStack buffer i (zero at text positions) to the hidden states after
loop index i. vtw's layer K runs layers K..L-1 and the later layers pass through, so for K < 2 the
loop's additions i >= K land after the deep layers: + 0.0 on kept (text) rows; on the withdrawn
(visual) rows they would add the later DeepStack features to the early-exit value, which is
sampled when a prompt ends on a visual token (the last prompt here), so vtw zeroes those levels
for the step (vtw.vllm._runner._skip_deepstack), as the withdrawn model skips DeepStack from K on."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from vtw.vllm import _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 24
# and a prompt that ends on its picture's last image token: the first generated token comes from a
# withdrawn row (its early-exit value)
PROMPTS = tiny.QWEN_PROMPTS + [("where is the shape <|vision_start|><|image_pad|>", 1)]
ABORTED = (tiny.QWEN_IMAGE + " this one is aborted", 4)
DEPTH = tiny.QWEN3_DEEPSTACK


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"), layers=LAYERS)


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return tiny.build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl_moe"), layers=LAYERS, moe=True)


def _engine(folder, layer, kv=None, blocks=5, **kw):
    from vllm import LLM

    # blocks of 32 tokens: the longest request needs 2-3; chunks of 16 tokens split the images
    over = {"vtw_layer": layer, **({"vtw_kv": kv} if kv else {})}
    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=96,
               max_num_batched_tokens=16, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=over, **kw)


@pytest.fixture(scope="module")
def llm(folder):
    # 4 usable blocks; re-wired to each K between workloads (set_layer), so eager
    engine = _engine(folder, LAYERS // 2, "shared", enforce_eager=True)
    yield engine
    del engine


def _hf(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return _hf(folder)


@pytest.fixture(scope="module")
def moe_hf(moe_folder):
    return _hf(moe_folder)


class _Stop(Exception):
    pass


@torch.no_grad()
def _lm_inputs(model, inputs):
    """What HF's Qwen3-VL passes its language model: embeddings, the [3, 1, S] M-RoPE positions, the
    visual positions [S] and the DeepStack features (one [n visual, D] per injected layer)."""
    got = {}

    def hook(mod, args, kwargs):
        got.update(kwargs)
        raise _Stop

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    embeds, pos = got["inputs_embeds"], got["position_ids"]
    if pos is None:  # a text-only prompt: HF's text model counts positions itself (0..S-1 on every stream)
        pos = torch.arange(embeds.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    if pos.ndim == 3 and pos.shape[0] == 4:  # text positions first
        pos = pos[1:]
    mask, ds = got.get("visual_pos_masks"), got.get("deepstack_visual_embeds")
    mask = torch.zeros(embeds.shape[1], dtype=torch.bool) if mask is None else mask[0].clone()
    return embeds, pos, mask, list(ds or [])


@torch.no_grad()
def _withdrawn_next(model, embeds, pos, visual, deepstack, ids, layer):
    """A cache-free forward of the withdrawn model on the HF modules: layers < K on every token (the
    DeepStack features added at the visual positions after layer i < len(deepstack)), layers >= K on
    the text tokens only, with their original [3, 1, n] positions (no DeepStack there: its positions
    are withdrawn)."""
    lm = model.model.language_model
    h = embeds
    for i in range(layer):
        h = lm.layers[i](h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
        if i < len(deepstack):
            h = h.clone()
            h[0, visual] = h[0, visual] + deepstack[i]
    if layer < len(lm.layers):
        keep = (ids != model.config.image_token_id) & (ids != model.config.video_token_id)
        if not keep[-1]:
            return int(model.lm_head(lm.norm(h[:, -1:]))[0, -1].argmax())
        h, pos = h[:, keep], pos[:, :, keep]
        for i in range(layer, len(lm.layers)):
            h = lm.layers[i](h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
    return int(model.lm_head(lm.norm(h[:, -1:]))[0, -1].argmax())


def _reference(hf, layer, prompts=PROMPTS, deepstack=True):
    """Greedy tokens, every step recomputed from scratch. The prompt's embeddings, M-RoPE positions
    and DeepStack features are HF's own; a generated token is embedded by the token table (no
    DeepStack: not a picture's position) and placed at the next position on all three streams (one
    past the largest so far), as HF's decoding does. `deepstack=False`: without DeepStack (to show
    it matters in this tiny model)."""
    model, proc = hf
    emb = model.model.language_model.embed_tokens
    out = []
    for text, seed in prompts:
        inputs = dict(proc(text=text, images=tiny.qwen3_image(seed) if seed is not None else None,
                           return_tensors="pt"))
        embeds, pos, visual, ds = _lm_inputs(model, inputs)
        if not deepstack:
            ds = []
        ids = inputs["input_ids"][0]
        assert int(visual.sum()) == int((ids == model.config.image_token_id).sum())
        toks = []
        for _ in range(NEW):
            t = _withdrawn_next(model, embeds, pos, visual, ds, ids, layer)
            toks.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
            visual = torch.cat([visual, torch.tensor([False])])
            with torch.no_grad():
                embeds = torch.cat([embeds, emb(torch.tensor([[t]]))], 1)
            pos = torch.cat([pos, (pos.max() + 1).view(1, 1, 1).expand(3, 1, 1)], 2)
        out.append((inputs["input_ids"][0].tolist(), toks))
    return out


def _runner_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def _check(got, want, label):
    for (gp, gt), (wp, wt), (text, _) in zip(got, want, PROMPTS):
        assert gp == wp, f"prompt ids differ for {text!r}"
        assert gt == wt, f"{label}, {text!r}: vLLM {gt} != reference {wt}"


def _workload(engine):
    return tiny.run_workload(engine, NEW, PROMPTS, image=tiny.qwen3_image, aborted=ABORTED)


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    _runner.set_layer(_runner_of(llm), layer)
    try:
        got, preempted = _workload(llm)
    finally:
        _runner.set_layer(_runner_of(llm), LAYERS // 2)
    _check(got, _reference(hf, layer), f"shared, K={layer}")
    assert preempted > 0, "the workload was meant to preempt a request"
    free, total = tiny.free_blocks(llm)
    assert free == total, f"{total - free} KV blocks still held after the workload"


def test_reference_is_hf_and_deepstack_matters(hf):
    """The cache-free reference at K = L is HF's own greedy generate (the unmodified model), at K = 1
    vtw.enable's on the HF model (an independent implementation: its KV cache, DeepStack skipped from
    K on); and DeepStack changes the tiny model's tokens (at K = L and at K = 2), so the tests above
    see it. Not for the prompt that ends on an image token: after it, HF's generate (transformers
    5.19) steps each position stream from its own last value (t, h, w + 1: 6, 7, 9 after an image
    ending at 5, 6, 8), where its get_rope_index, vLLM and the reference put the next token one past
    the largest on all three (9, 9, 9)."""
    import vtw

    model, proc = hf

    def generate(prompts):
        out = []
        for text, seed in prompts:
            inputs = proc(text=text, images=tiny.qwen3_image(seed) if seed is not None else None,
                          return_tensors="pt")
            with torch.no_grad():
                g = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            out.append((inputs["input_ids"][0].tolist(), g[0, inputs["input_ids"].shape[1]:].tolist()))
        return out

    ends_text = [p for p in PROMPTS if not p[0].endswith("<|image_pad|>")]
    assert len(ends_text) == len(PROMPTS) - 1
    full = _reference(hf, LAYERS)
    assert generate(ends_text) == _reference(hf, LAYERS, ends_text)
    vtw.enable(model, 1)
    try:
        enabled = generate(ends_text)
    finally:
        vtw.disable(model)
    assert enabled == _reference(hf, 1, ends_text)
    images = [p for p in PROMPTS if p[1] is not None]
    # DeepStack after layer i reaches the text tokens through layer i + 1: K = 2 (= its depth here)
    # sees the features of layer 0 only, K = L both; at K <= 1 they reach only withdrawn tokens
    for layer, want in ((LAYERS, full), (DEPTH, _reference(hf, DEPTH))):
        with_ds = [r for r, p in zip(want, PROMPTS) if p[1] is not None]
        assert _reference(hf, layer, images, deepstack=False) != with_ds, f"K={layer}: DeepStack changes nothing"


def test_withdrawal_changes_image_requests(hf):
    full, withdrawn = _reference(hf, LAYERS), _reference(hf, 1)
    assert any(a[1] != b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS) if s is not None)
    # a text-only request is untouched unless it generates a visual token id (withdrawn too)
    visual = {hf[0].config.image_token_id, hf[0].config.video_token_id}
    assert all(a[1] == b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS)
               if s is None and not visual & set(a[1]))


def test_text_only_tokens_equal_withdrawn_model(folder, hf, llm):
    """A second engine, vtw_kv="text_only" at K = 1 (inside the DeepStack layers; the deep layers in KV
    groups of their own), with vLLM's compilation on (its default): steps with every token kept run the
    compiled graph, steps with visual tokens eagerly."""
    del llm  # the module engine stays; this one is started after it
    engine = _engine(folder, 1, blocks=4 * 3 + 1)  # 4 KV groups (1 shallow, 3 deep) x 3 blocks + 1
    try:
        got, preempted = _workload(engine)
        _check(got, _reference(hf, 1), "text_only, K=1")
        assert preempted > 0
        compiles, compiled, eager = tiny.step_paths(engine)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(engine)
        assert free == total
    finally:
        del engine


@pytest.mark.parametrize("layer", [1])
def test_moe_text_only_tokens_equal_withdrawn_model(moe_folder, moe_hf, layer):
    """Qwen3-VL-MoE (4 experts, 2 per token, in every layer), vtw_kv="text_only", K inside the
    DeepStack layers, vLLM's compilation on."""
    engine = _engine(moe_folder, layer, blocks=4 * 3 + 1)  # 4 KV groups (1 shallow, 3 deep) x 3 blocks + 1
    try:
        got, preempted = _workload(engine)
        _check(got, _reference(moe_hf, layer), f"MoE text_only, K={layer}")
        assert preempted > 0
        compiles, compiled, eager = tiny.step_paths(engine)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(engine)
        assert free == total
    finally:
        del engine


def test_moe_withdrawal_changes_image_requests(moe_hf):
    full, withdrawn = _reference(moe_hf, LAYERS), _reference(moe_hf, 1)
    assert any(a[1] != b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS) if s is not None)


def test_video_pruning_is_refused(folder):
    """Video token pruning (EVS) changes the prompt and the M-RoPE positions' layout: untested, so
    refused at engine start (the engine's config only, no model load); without it the same config
    is accepted."""
    from vllm.engine.arg_utils import EngineArgs

    from vtw.vllm import _config

    def config(**kw):
        return EngineArgs(model=str(folder), dtype="float32", max_model_len=96, distributed_executor_backend="uni",
                          hf_overrides={"vtw_layer": 1}, **kw).create_engine_config()

    with pytest.raises(Exception, match="video token pruning"):
        config(video_pruning_rate=0.5)
    s = _config.settings(config().model_config)
    assert (s.layer, s.kv, s.family) == (1, "text_only", "Qwen3-VL")
