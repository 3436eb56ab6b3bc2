"""vtw.vllm on a tiny InternVL in the HF format (InternVL3-*-hf, architecture
InternVLForConditionalGeneration, which vLLM runs with its InternS1 implementation; random
weights, built locally: Qwen2 language model, InternViT tiles with pixel shuffle, up to 4 tiles
and a thumbnail). Only the <IMG_CONTEXT> positions (the config's image_token_id) are visual: the
<img> / </img> around them are text and stay. Greedy tokens equal the cache-free recomputation of
the withdrawn model on the HF modules (tests/_vllm_plain.py) in a continuously batched workload
with preemption, 32-token prefill chunks that split images, an abort and text-only requests;
K = 0, 1, L/2, L-1, L on one eager engine re-wired per K (shared KV), and vtw_kv="text_only" on
an engine with vLLM's compilation on; every KV block is free afterwards. Video inputs are
refused at engine start (vLLM marks their frames with the tokenizer's <video> id, which the
config does not name)."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import _vllm_plain as plain  # noqa: E402
from vtw.vllm import _config, _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 24
IMG = tiny.INTERNVL_IMAGE
PROMPTS = [
    (f"{IMG} what shape is in the picture", 0),
    ("what color is the square", None),
    (f"{IMG} is there a circle", 1),
    (f"{IMG} " + " ".join(["describe the shapes and colors"] * 3), 2),
    ("how many shapes", None),
    (f"where is the red shape {IMG} yes", 3),
    (f"{IMG} yes", 4),
]
ABORTED = (f"{IMG} this one is aborted", 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_internvl(tmp_path_factory.mktemp("tiny_internvl"), layers=LAYERS)


@pytest.fixture(scope="module")
def hf(folder):
    return plain.load_hf(folder)


def _visual(hf):  # the family's config field, read here (not through vtw)
    return {hf[0].config.image_token_id}


_REFS = {}  # layer -> reference (the same model for the whole module)


def _reference(hf, layer):
    if layer not in _REFS:
        _REFS[layer] = plain.reference(hf, layer, PROMPTS, NEW, tiny.internvl_image, _visual(hf))
    return _REFS[layer]


def _engine(folder, kv, layer, blocks, eager, video=0):
    from vllm import LLM

    # blocks of 32 tokens; prefill chunks of 32 tokens split images of 48..80 image tokens
    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=128,
               max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               limit_mm_per_prompt={"image": 1, "video": video}, enforce_eager=eager,
               hf_overrides={"vtw_layer": layer, "vtw_kv": kv})


@pytest.fixture(scope="module")
def llm(folder):
    # re-wired to each K between workloads (set_layer needs an eager engine); a 110-token request
    # needs 4 blocks of the 6 usable: requests get preempted
    engine = _engine(folder, "shared", LAYERS // 2, blocks=7, eager=True)
    yield engine
    del engine


def test_engine_start(llm, hf):
    st = _runner.state_of(plain.runner_of(llm))
    assert st is not None and st.settings.layer == LAYERS // 2 and st.settings.family == "InternVL"
    assert st.settings.token_ids == (hf[0].config.image_token_id,)  # <img> / </img> are text
    plain.check_runner(st)


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    plain.at_layer(llm, layer, lambda: plain.check_workload(llm, _reference(hf, layer), PROMPTS, NEW, tiny.internvl_image,
                                                            ABORTED, layer))


def test_text_only_compiled_tokens_equal_withdrawn_model(folder, hf):
    """A second engine: vtw_kv="text_only" at K = 1, vLLM's compilation on (its default)."""
    engine = _engine(folder, "text_only", 1, blocks=4 * 4 + 1, eager=False)
    try:
        plain.check_workload(engine, _reference(hf, 1), PROMPTS, NEW, tiny.internvl_image, ABORTED, 1)
        plain.check_compiled(engine)
    finally:
        del engine


def test_video_refused_at_engine_start(folder):
    with pytest.raises(Exception) as e:
        _engine(folder, "shared", 1, blocks=7, eager=True, video=1)
    err = _config.setting_error(e.value)
    assert err is not None and "video" in str(err), e.value


def test_withdrawal_changes_image_requests(hf):
    plain.changes_image_requests(_reference(hf, LAYERS), _reference(hf, 1), PROMPTS, _visual(hf))


def test_image_markers_are_text(hf):
    """The reference would differ if <img> / </img> were withdrawn too (so the comparison above
    checks that they are kept)."""
    tok = hf[1].tokenizer
    markers = {tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")}
    both = _visual(hf) | markers
    assert plain.reference(hf, 1, PROMPTS, NEW, tiny.internvl_image, both) != _reference(hf, 1)
