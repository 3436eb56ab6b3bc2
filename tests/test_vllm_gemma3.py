"""vtw.vllm on a tiny Gemma 3 (random weights, built locally): 6 decoder layers in Gemma 3's pattern
(layers 0-4 slide a window, layer 5 attends fully; the two kinds have different rotary bases),
16 image tokens per picture between <start_of_image> and <end_of_image> (text tokens).

What vtw.vllm accepts for Gemma 3 (vtw.vllm._config.check_window): a sliding-window layer from K
on only where its window cannot bind (max_model_len <= sliding_window), since the deep layers
attend over a request's text tokens compacted by text rank, and vtw's definition slides the
window over original positions. The engine here runs at max_model_len = sliding_window.

The reference is the withdrawn model recomputed cache-free at every step on the Hugging Face
modules with explicit masks written from the definition: layers < K on every token (causal, the
sliding window over positions on sliding layers; image tokens bidirectional within their picture
exactly where vLLM's attention backend does that, see _bidirectional), layers >= K on the text
tokens only, at their original positions, the window over original positions; each layer type
with its own rotary. The masks are checked against Hugging Face's own Gemma 3 forward (with and
without token_type_ids) at K = L.
"""

import os

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from vtw.vllm import _config, _runner, tiny  # noqa: E402

LAYERS = 6
NEW = 24
WINDOW = 128  # the tiny model's sliding_window; the engines run at max_model_len = WINDOW
PROMPTS = tiny.GEMMA_PROMPTS
ABORTED = (tiny.GEMMA_IMAGE + " this one is aborted", 5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), layers=LAYERS, sliding_window=WINDOW)


def _engine(folder, **kw):
    from vllm import LLM

    # blocks of 16 tokens, few of them: requests get preempted; prefill chunks of 16 tokens split
    # every picture (18 tokens with <start/end_of_image>) and leave chunks without text
    args = dict(dtype="float32", distributed_executor_backend="uni", max_model_len=WINDOW,
                max_num_batched_tokens=16, max_num_seqs=4, seed=0, block_size=16,
                limit_mm_per_prompt={"image": 1})
    args.update(kw)
    return LLM(str(folder), **args)


@pytest.fixture(scope="module")
def llm(folder):
    engine = _engine(folder, num_gpu_blocks_override=NUM_BLOCKS_SHARED,
                     enforce_eager=True,  # re-wired to each K between workloads (set_layer)
                     hf_overrides={"vtw_layer": LAYERS // 2, "vtw_kv": "shared"})
    yield engine
    del engine


# KV pools small enough that the workload preempts: shared keeps every layer's KV in blocks for
# every token (a sliding and a full group), text_only a few blocks over one max_model_len request
NUM_BLOCKS_SHARED = 30
NUM_BLOCKS_TEXT_ONLY = 10


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(folder)


def _runner_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def _bidirectional(llm) -> bool:
    """Whether the engine's image tokens attend to each other bidirectionally in the layers < K:
    vLLM marks Gemma 3 a multimodal prefix LM (``is_mm_prefix_lm``) and passes each picture's
    range in the attention metadata, which only a backend with ``supports_mm_prefix()`` applies
    (vLLM's CPU backend does not: there the image tokens attend causally, as in stock vLLM)."""
    mc = llm.llm_engine.vllm_config.model_config
    runner = _runner_of(llm)
    layers = _runner.language_layers(runner.get_model() if hasattr(runner, "get_model") else runner.model)[0]
    backend = layers[0].self_attn.attn.attn_backend
    return bool(mc.is_mm_prefix_lm and backend.supports_mm_prefix())


class _Stop(Exception):
    pass


@torch.no_grad()
def _lm_embeds(model, inputs):
    """The language model's input embeddings as HF computes them (scaled text embeddings, the
    projected picture scattered in)."""
    got = {}

    def hook(mod, args, kwargs):
        got["e"] = kwargs["inputs_embeds"]
        raise _Stop

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    return got["e"]


def _picture_blocks(token_type_ids, n):
    """[n] id of the picture each position's image token belongs to (-1: not an image token of the
    prompt; generated tokens never are), from the processor's token_type_ids (as HF's Gemma 3)."""
    tt = token_type_ids[0].tolist()
    out, cur, prev = [], -1, 0
    for t in tt:
        if t == 1 and prev != 1:
            cur += 1
        out.append(cur if t == 1 else -1)
        prev = t
    return torch.tensor(out + [-1] * (n - len(out)))


def _mask(qpos, kpos, sliding, window, qblock=None, kblock=None):
    """Additive [1, 1, q, k] mask: causal over original positions, OR within one picture
    (bidirectional, if blocks are given), AND the sliding window over original positions
    (q - k < window) on a sliding layer, as Hugging Face's Gemma 3 composes them."""
    allowed = kpos[None, :] <= qpos[:, None]
    if qblock is not None:
        allowed = allowed | ((qblock[:, None] == kblock[None, :]) & (qblock[:, None] >= 0))
    if sliding:
        allowed = allowed & (qpos[:, None] - kpos[None, :] < window)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def _withdrawn_logits(model, embeds, ids, blocks, layer, bidirectional):
    """The last position's logits of the withdrawn model, cache-free, on the HF modules."""
    lm = model.model.language_model
    cfg = lm.config
    n = embeds.shape[1]
    pos = torch.arange(n)
    h = embeds
    blk = blocks if bidirectional else None
    for i in range(min(layer, LAYERS)):
        kind = cfg.layer_types[i]
        m = _mask(pos, pos, kind == "sliding_attention", cfg.sliding_window, blk, blk)
        h = lm.layers[i](h, position_embeddings=lm.rotary_emb(h, pos[None], kind), attention_mask=m)
    if layer < LAYERS:
        keep = ids != model.config.image_token_id
        if not keep[-1]:  # a visual last token: the early-exit value
            return model.lm_head(lm.norm(h[:, -1:]))[0, -1]
        h, kpos = h[:, keep], pos[keep]
        for i in range(layer, LAYERS):
            kind = cfg.layer_types[i]
            m = _mask(kpos, kpos, kind == "sliding_attention", cfg.sliding_window)
            h = lm.layers[i](h, position_embeddings=lm.rotary_emb(h, kpos[None], kind), attention_mask=m)
    return model.lm_head(lm.norm(h[:, -1:]))[0, -1]


def _inputs(proc, text, seed):
    return dict(proc(text=text, images=tiny.gemma_image(seed) if seed is not None else None, return_tensors="pt"))


_REFS: dict = {}


def _reference(hf, layer, bidirectional):
    """Greedy tokens of the withdrawn model, every step recomputed from scratch; a generated token
    is embedded by the (scaled) token table, as vLLM and HF's decoding do (computed once per K and
    masking for the module)."""
    key = (id(hf[0]), layer, bidirectional)
    if key not in _REFS:
        _REFS[key] = _compute_reference(hf, layer, bidirectional)
    return _REFS[key]


def _compute_reference(hf, layer, bidirectional):
    model, proc = hf
    emb = model.model.language_model.embed_tokens
    out = []
    for text, seed in PROMPTS:
        inputs = _inputs(proc, text, seed)
        ids = inputs["input_ids"][0]
        embeds = _lm_embeds(model, inputs)
        toks = []
        for _ in range(NEW):
            blocks = _picture_blocks(inputs["token_type_ids"], ids.numel())
            t = int(_withdrawn_logits(model, embeds, ids, blocks, layer, bidirectional).argmax())
            toks.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
            with torch.no_grad():
                embeds = torch.cat([embeds, emb(torch.tensor([[t]]))], 1)
        out.append((inputs["input_ids"][0].tolist(), toks))
    return out


def test_reference_masks_are_hf_gemma3(hf):
    """At K = L the reference's hand-written masks give Hugging Face's own Gemma 3 logits: with
    token_type_ids (image tokens bidirectional within their picture) and without (causal), and
    the two differ on a picture (so which one the engine uses is seen by the K = L test)."""
    model, proc = hf
    differ = False
    for text, seed in PROMPTS:
        inputs = _inputs(proc, text, seed)
        ids = inputs["input_ids"][0]
        embeds = _lm_embeds(model, inputs)
        blocks = _picture_blocks(inputs["token_type_ids"], ids.numel())
        with torch.no_grad():
            bidi = model(**inputs).logits[0, -1]
            causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0, -1]
        ref_bidi = _withdrawn_logits(model, embeds, ids, blocks, LAYERS, True)
        ref_causal = _withdrawn_logits(model, embeds, ids, blocks, LAYERS, False)
        torch.testing.assert_close(ref_bidi, bidi, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ref_causal, causal, atol=1e-4, rtol=1e-5)
        differ |= seed is not None and (bidi - causal).abs().max().item() > 1e-3
    assert differ


def test_withdrawal_changes_image_requests(hf):
    for bidi in (False, True):
        full, withdrawn = _reference(hf, LAYERS, bidi), _reference(hf, 1, bidi)
        assert any(a[1] != b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS) if s is not None)
        visual = hf[0].config.image_token_id
        assert all(a[1] == b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS)
                   if s is None and visual not in a[1])


def _engine_config(folder, max_model_len, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(folder), dtype="float32", max_model_len=max_model_len,
                      distributed_executor_backend="uni", hf_overrides=overrides)
    return args.create_engine_config()


@pytest.mark.parametrize("kv", ["shared", "text_only"])
def test_window_that_can_bind_is_refused(folder, kv):
    """A deep sliding layer whose window is shorter than max_model_len: refused at engine start
    with one line naming the layers, the window, max_model_len and what to change."""
    for layer in (0, 3, 4):
        with pytest.raises(Exception, match=rf"decoder layers {', '.join(map(str, range(layer, 5)))} \(>= "
                                            rf"vtw_layer={layer}\) slide a window of sliding_window={WINDOW} tokens, "
                                            rf"shorter than max_model_len={WINDOW + 1}, .*pass max_model_len <= "
                                            rf"{WINDOW}, or vtw_layer >= 5 \(after the last sliding layer\)"):
            _engine_config(folder, WINDOW + 1, vtw_layer=layer, vtw_kv=kv)
    # accepted: no sliding layer from K on (layer 5 attends fully), K = L, or max_model_len <= window
    assert _config.settings(_engine_config(folder, WINDOW + 1, vtw_layer=5, vtw_kv=kv).model_config).layer == 5
    assert _config.settings(_engine_config(folder, WINDOW + 1, vtw_layer=LAYERS, vtw_kv=kv).model_config).active is False
    assert _config.settings(_engine_config(folder, WINDOW, vtw_layer=0, vtw_kv=kv).model_config).layer == 0


def test_set_layer_refuses_a_window_that_can_bind(folder):
    """Re-wiring an engine to a K with a deep sliding layer is refused the same way (before the
    model is touched)."""
    from types import SimpleNamespace

    runner = SimpleNamespace(model_config=_engine_config(folder, WINDOW + 1, vtw_layer=5, vtw_kv="shared").model_config)
    for layer in (0, 4):
        with pytest.raises(_config.SettingError, match=rf"slide a window of sliding_window={WINDOW} tokens"):
            _runner.set_layer(runner, layer)


def test_engine_start(llm):
    st = _runner.state_of(_runner_of(llm))
    assert st is not None and st.settings.layer == LAYERS // 2 and st.settings.family == "Gemma 3"
    assert st.settings.token_ids == (llm.llm_engine.vllm_config.model_config.hf_config.image_token_index,)
    # both layer kinds are deep at K = L/2, and vLLM gave the sliding ones their window
    kinds = {i: st.layers[i].self_attn.attn.sliding_window for i in st.names}
    assert kinds == {3: WINDOW, 4: WINDOW, 5: None}, kinds
    mrv2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
    assert ("Model Runner V2" in st.runner_name) == mrv2, st.runner_name


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    _runner.set_layer(_runner_of(llm), layer)
    try:
        got, preempted = tiny.run_workload(llm, NEW, PROMPTS, image=tiny.gemma_image, aborted=ABORTED)
        st = _runner.state_of(_runner_of(llm))
    finally:
        _runner.set_layer(_runner_of(llm), LAYERS // 2)
    want = _reference(hf, layer, _bidirectional(llm))
    for (gp, gt), (wp, wt), (text, _) in zip(got, want, PROMPTS):
        assert gp == wp, f"prompt ids differ for {text!r}"
        assert gt == wt, f"K={layer}, {text!r}: vLLM {gt} != reference {wt}"
    assert preempted > 0, "the workload was meant to preempt a request"
    free, total = tiny.free_blocks(llm)
    assert free == total, f"{total - free} KV blocks still held after the workload"
    if layer < LAYERS:
        assert st is not None and st.steps > 0
    else:
        assert st is None


def test_text_only_compiled_engine(folder, hf, llm):
    """A second engine: vtw_kv="text_only" at K = L/2 (deep sliding layers 3, 4, whose window
    cannot bind, and the full layer 5 in text-only KV groups), vLLM's default compilation."""
    del llm  # the module engine stays; this one is started after it
    engine = _engine(folder, num_gpu_blocks_override=NUM_BLOCKS_TEXT_ONLY, hf_overrides={"vtw_layer": LAYERS // 2})
    try:
        from vtw.vllm._text_only import TextOnlyAttentionSpec

        kv = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
        st = _runner.state_of(_runner_of(engine))
        deep = set(st.names.values())
        for g in kv.kv_cache_groups:
            mine = deep & set(g.layer_names)
            assert not mine or (mine == set(g.layer_names) and isinstance(g.kv_cache_spec, TextOnlyAttentionSpec)), g
        got, preempted = tiny.run_workload(engine, NEW, PROMPTS, image=tiny.gemma_image, aborted=ABORTED)
        for (gp, gt), (wp, wt) in zip(got, _reference(hf, LAYERS // 2, _bidirectional(engine))):
            assert gp == wp
            assert gt == wt, f"text_only, K={LAYERS // 2}: vLLM {gt} != reference {wt}"
        assert preempted > 0
        compiles, compiled, eager = tiny.step_paths(engine)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(engine)
        assert free == total
    finally:
        del engine
