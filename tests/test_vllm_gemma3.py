"""vtw.vllm on a tiny Gemma 3 (random weights, built locally): 6 decoder layers in Gemma 3's pattern
(layers 0-4 slide a window, layer 5 attends fully; the two kinds have different rotary bases),
16 image tokens per picture between <start_of_image> and <end_of_image> (text tokens).

Two tiny models: one whose window cannot bind (sliding_window = max_model_len = 128: the deep
sliding layers are handled like full-attention ones, by text rank, text_only included), and one
whose window binds (sliding_window = 20, shorter than the prompts and the generations, under
max_model_len = 128): there the deep sliding layers keep their KV by position in vLLM's
sliding-window groups and attend through vtw.vllm._window (over original positions), in both KV
modes; text_only puts the deep full-attention layer in a text-only group.

The reference is the withdrawn model recomputed cache-free at every step on the Hugging Face
modules with explicit masks written from the definition: layers < K on every token (causal, the
sliding window over positions on sliding layers; image tokens bidirectional within their picture
exactly where vLLM's attention backend does that, see _bidirectional), layers >= K on the text
tokens only, at their original positions, the window over original positions; each layer type
with its own rotary. The masks are checked against Hugging Face's own Gemma 3 forward (with and
without token_type_ids) at K = L.
"""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)
import _vllm_plain as plain  # noqa: E402

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
    return plain.load_hf(folder, attn="eager")


def _bidirectional(llm) -> bool:
    """Whether the engine's image tokens attend to each other bidirectionally in the layers < K:
    vLLM marks Gemma 3 a multimodal prefix LM (``is_mm_prefix_lm``) and passes each picture's
    range in the attention metadata, which only a backend with ``supports_mm_prefix()`` applies
    (vLLM's CPU backend does not: there the image tokens attend causally, as in stock vLLM)."""
    mc = llm.llm_engine.vllm_config.model_config
    runner = plain.runner_of(llm)
    layers = _runner.language_layers(runner.get_model() if hasattr(runner, "get_model") else runner.model)[0]
    backend = layers[0].self_attn.attn.attn_backend
    return bool(mc.is_mm_prefix_lm and backend.supports_mm_prefix())


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
        embeds = plain.lm_inputs_embeds(model, inputs)
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
        embeds = plain.lm_inputs_embeds(model, inputs)
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
def test_which_windows_bind(folder, kv):
    """The deep sliding layers whose window is shorter than max_model_len are the positional ones
    (layers 0-4 slide, layer 5 attends fully); none at max_model_len <= window or K = L."""
    def windows(max_len, layer):
        return _config.settings(_engine_config(folder, max_len, vtw_layer=layer, vtw_kv=kv).model_config).windows

    assert windows(WINDOW + 1, 0) == tuple((i, WINDOW) for i in range(5))
    assert windows(WINDOW + 1, 3) == ((3, WINDOW), (4, WINDOW))
    assert windows(WINDOW + 1, 5) == ()
    assert windows(WINDOW + 1, LAYERS) == ()
    assert windows(WINDOW, 0) == ()


def test_binding_window_with_a_quantised_cache_is_refused(folder):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(folder), dtype="float32", max_model_len=WINDOW + 1, kv_cache_dtype="fp8",
                      distributed_executor_backend="uni", hf_overrides={"vtw_layer": 3, "vtw_kv": "shared"})
    with pytest.raises(Exception, match=r"kv_cache_dtype='fp8'.*pass max_model_len <= 128"):
        args.create_engine_config()


def test_engine_start(llm):
    st = _runner.state_of(plain.runner_of(llm))
    assert st is not None and st.settings.layer == LAYERS // 2 and st.settings.family == "Gemma 3"
    assert st.settings.token_ids == (llm.llm_engine.vllm_config.model_config.hf_config.image_token_index,)
    # both layer kinds are deep at K = L/2, and vLLM gave the sliding ones their window
    kinds = {i: st.layers[i].self_attn.attn.sliding_window for i in st.names}
    assert kinds == {3: WINDOW, 4: WINDOW, 5: None}, kinds
    plain.check_runner(st)


def _check_workload_at(llm, hf, layer):
    """The shared engine re-wired to K = `layer`: the workload against the reference (preempted,
    no block left); returns the state the workload ran with (None at K = L)."""
    want = _reference(hf, layer, _bidirectional(llm))
    _, st = plain.at_layer(llm, layer, lambda: plain.check_workload(llm, want, PROMPTS, NEW, tiny.gemma_image,
                                                                    ABORTED, layer))
    if layer < LAYERS:
        assert st is not None and st.steps > 0
    else:
        assert st is None
    return st


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    st = _check_workload_at(llm, hf, layer)
    assert st is None or st.positional == {}  # the window cannot bind: nothing by position


def _check_text_only_engine(engine, hf, group_ok):
    """The text_only engine at K = L/2 with vLLM's default compilation: its KV cache groups
    (group_ok(group, deep layer names of the group, state) for each group holding a deep layer),
    then the workload against the reference, compiled and eager steps, no block left."""
    kv = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    st = _runner.state_of(plain.runner_of(engine))
    deep = set(st.names.values())
    for g in kv.kv_cache_groups:
        mine = deep & set(g.layer_names)
        assert not mine or group_ok(g, mine, st), g
    got, preempted = tiny.run_workload(engine, NEW, PROMPTS, image=tiny.gemma_image, aborted=ABORTED)
    for (gp, gt), (wp, wt) in zip(got, _reference(hf, LAYERS // 2, _bidirectional(engine))):
        assert gp == wp
        assert gt == wt, f"text_only, K={LAYERS // 2}: vLLM {gt} != reference {wt}"
    assert preempted > 0
    compiles, compiled, eager = tiny.step_paths(engine)
    assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
    free, total = tiny.free_blocks(engine)
    assert free == total


def test_text_only_compiled_engine(folder, hf, llm):
    """A second engine: vtw_kv="text_only" at K = L/2 (deep sliding layers 3, 4, whose window
    cannot bind, and the full layer 5 in text-only KV groups), vLLM's default compilation."""
    from vtw.vllm._text_only import TextOnlyAttentionSpec

    del llm  # the module engine stays; this one is started after it
    engine = _engine(folder, num_gpu_blocks_override=NUM_BLOCKS_TEXT_ONLY, hf_overrides={"vtw_layer": LAYERS // 2})
    try:
        _check_text_only_engine(engine, hf, lambda g, mine, st: mine == set(g.layer_names)
                                and isinstance(g.kv_cache_spec, TextOnlyAttentionSpec))
    finally:
        del engine


# ---------------------------------------------------------------------------------------------
# a window that binds: sliding_window = 20 under max_model_len = 128 (every prompt with a picture
# is longer than the window, and every generation passes it)

SHORT = 20
SHORT_MAX_LEN = 128


@pytest.fixture(scope="module")
def folder_short(tmp_path_factory):
    return tiny.build_gemma3(tmp_path_factory.mktemp("tiny_gemma3_short"), layers=LAYERS, sliding_window=SHORT)


@pytest.fixture(scope="module")
def hf_short(folder_short):
    return plain.load_hf(folder_short, attn="eager")


@pytest.fixture(scope="module")
def llm_short(folder_short):
    engine = _engine(folder_short, max_model_len=SHORT_MAX_LEN, num_gpu_blocks_override=NUM_BLOCKS_SHARED,
                     enforce_eager=True,  # re-wired to each K between workloads (set_layer)
                     hf_overrides={"vtw_layer": LAYERS // 2, "vtw_kv": "shared"})
    yield engine
    del engine


def test_short_window_binds_in_the_reference(hf_short):
    """The short window changes the model's answers (else the tests below could not tell a window
    over positions from none), and withdrawal changes them again."""
    full, withdrawn = _reference(hf_short, LAYERS, False), _reference(hf_short, 1, False)
    assert max(len(p) for p, _ in full) > SHORT
    assert any(a[1] != b[1] for a, b in zip(full, withdrawn))
    # the same weights with a window that cannot bind (every token in view): other tokens
    cfg = hf_short[0].model.language_model.config
    saved = cfg.sliding_window
    try:
        cfg.sliding_window = SHORT_MAX_LEN
        no_window = _compute_reference(hf_short, 1, False)
    finally:
        cfg.sliding_window = saved
    assert any(a[1] != b[1] for a, b in zip(withdrawn, no_window))


def test_short_window_engine_start(llm_short):
    st = _runner.state_of(plain.runner_of(llm_short))
    assert st.positional == {3: SHORT, 4: SHORT}
    from vtw.vllm._window import WindowImpl

    assert all(isinstance(st.layers[i].self_attn.attn.impl, WindowImpl) for i in (3, 4))
    assert not isinstance(st.layers[5].self_attn.attn.impl, WindowImpl)
    assert not isinstance(st.layers[2].self_attn.attn.impl, WindowImpl)


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_short_window_tokens_equal_withdrawn_model(llm_short, hf_short, layer):
    """shared KV, the window over original positions in the deep sliding layers, K = 0 .. L."""
    st = _check_workload_at(llm_short, hf_short, layer)
    assert (dict(st.positional) if st is not None else {}) == {i: SHORT for i in range(layer, 5)}


def test_short_window_text_only_compiled_engine(folder_short, hf_short, llm_short):
    """vtw_kv="text_only" (the default) at K = L/2 with vLLM's default compilation: the deep
    sliding layers 3, 4 stay in vLLM's sliding-window groups (by position), the full layer 5 goes
    to a text-only group."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from vtw.vllm._text_only import TextOnlyAttentionSpec

    def group_ok(g, mine, st):
        if st.names[5] in mine:  # the full layer: a text-only group of its own
            return set(g.layer_names) == {st.names[5]} and isinstance(g.kv_cache_spec, TextOnlyAttentionSpec)
        # the sliding layers 3, 4: vLLM's sliding-window groups, by position
        return (mine <= {st.names[3], st.names[4]} and type(g.kv_cache_spec) is SlidingWindowSpec
                and g.kv_cache_spec.sliding_window == SHORT)

    del llm_short
    engine = _engine(folder_short, max_model_len=SHORT_MAX_LEN, num_gpu_blocks_override=NUM_BLOCKS_SHARED,
                     hf_overrides={"vtw_layer": LAYERS // 2})
    try:
        _check_text_only_engine(engine, hf_short, group_ok)
    finally:
        del engine
