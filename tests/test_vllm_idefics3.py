"""vtw.vllm on a tiny Idefics3 and a tiny SmolVLM (Idefics3ForConditionalGeneration,
SmolVLMForConditionalGeneration: a SigLIP-style vision tower on tiles, pixel shuffle, a Llama
language model; random weights, built locally): the engine's greedy tokens equal those of the
withdrawn model recomputed cache-free on the Hugging Face modules at every step (test_vllm_llava's
reference on the text model), in a continuously batched workload with preemption, 16-token prefill
chunks that split the pictures, an abort and text-only requests, for K = 0, 1, L/2, L-1 and L (one
eager engine, vtw_kv="shared", re-wired per K) and in a second engine with vtw_kv="text_only"
and vLLM's compilation on; every KV block is free afterwards.

Only the <image> positions are visual: <fake_token_around_image>, <row_i_col_j>, <global-img> and
the newlines between the tiles are text tokens that the deep layers keep."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)
import _vllm_plain as plain  # noqa: E402

from test_vllm_llava import _reference as _llava_reference  # noqa: E402
from vtw.vllm import _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 24
IMG = tiny.IDEFICS3_IMAGE
PROMPTS = [
    (IMG + " " + " ".join(["describe the shapes and colors"] * 2), 1),  # 2 tiles + global: 48 image tokens
    (IMG + " what shape is in the picture", 0),  # 2 x 2 tiles + global: 80
    ("what color is the square", None),
    ("is there " + IMG + " a circle", 2),  # text on both sides of the picture
    ("how many shapes", None),
    (IMG + " yes", 5),
]
ABORTED = (IMG + " this one is aborted", 3)


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def folder(tmp_path_factory, request):
    return tiny.build_idefics3(tmp_path_factory.mktemp(request.param), layers=LAYERS, family=request.param)


@pytest.fixture(scope="module")
def hf(folder):
    return plain.load_hf(folder, eos=False)


def _reference(hf, layer):
    return _llava_reference(hf, layer, PROMPTS, NEW, image=tiny.idefics3_image)


def _engine(folder, kv, layer, blocks, eager):
    from vllm import LLM

    # blocks of 32 tokens; prefill chunks of 16 tokens split every picture (48 or 80 image tokens)
    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=128,
               max_num_batched_tokens=16, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               limit_mm_per_prompt={"image": 1}, enforce_eager=eager,
               hf_overrides={"vtw_layer": layer, "vtw_kv": kv})


@pytest.fixture(scope="module")
def llm(folder):
    # 4 usable blocks (a 128-token request needs 4): requests get preempted; re-wired to each K
    # between workloads (set_layer), which needs an eager engine
    engine = _engine(folder, "shared", LAYERS // 2, blocks=5, eager=True)
    yield engine
    del engine


def _check(llm, hf, layer):
    return plain.check_workload(llm, _reference(hf, layer), PROMPTS, NEW, tiny.idefics3_image, ABORTED, layer)


def test_visual_tokens_from_the_config(llm, hf):
    """vtw withdraws the config's image token id (<image>) only, in the runner this process asked for."""
    model, proc = hf
    st = _runner.state_of(plain.runner_of(llm))
    img = model.config.image_token_id
    assert img == proc.tokenizer.convert_tokens_to_ids("<image>")
    assert tuple(st.visual) == (img,), st.visual
    plain.check_runner(st)


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    got, st = plain.at_layer(llm, layer, lambda: _check(llm, hf, layer))
    if layer < LAYERS:  # the deep layers ran on the text tokens, the tile tags and newlines included
        img = hf[0].config.image_token_id
        assert st.deep_tokens_total >= sum(sum(1 for i in p if i != img) for p, _ in got)
    else:
        assert st is None  # K = L: the layers run stock


def test_withdrawal_changes_image_requests(hf):
    """The comparisons are not vacuous: withdrawal at K = 1 changes some image request's tokens."""
    full, withdrawn = _reference(hf, LAYERS), _reference(hf, 1)
    assert any(a[1] != b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS) if s is not None)
    img = hf[0].config.image_token_id
    assert all(a[1] == b[1] for a, b, (_, s) in zip(full, withdrawn, PROMPTS) if s is None and img not in a[1])


def test_text_only_tokens_equal_withdrawn_model(folder, hf):
    """A second engine: vtw_kv="text_only" at K = 1 (the deep layers in KV groups of their own),
    vLLM's compilation on (its default): steps with every token kept ran the compiled graph."""
    # K = 1: four groups of one layer; a request of max_model_len (4 blocks) must fit in each
    engine = _engine(folder, "text_only", 1, blocks=4 * 4 + 1, eager=False)
    try:
        _check(engine, hf, 1)
        plain.check_compiled(engine)
    finally:
        del engine
