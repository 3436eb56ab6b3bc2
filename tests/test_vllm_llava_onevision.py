"""vtw.vllm on a tiny LLaVA-OneVision (random weights, built locally: Qwen2 language model,
SigLIP tower, AnyRes with unpadding and a newline per row; every image position carries the
config's image_token_index and is withdrawn): greedy tokens equal the cache-free recomputation
of the withdrawn model on the HF modules (tests/_vllm_plain.py) in a continuously batched
workload with preemption, 32-token prefill chunks that split every image, an abort and
text-only requests; K = 0, 1, L/2, L-1, L on one eager engine re-wired per K (shared KV), and
vtw_kv="text_only" on an engine with vLLM's compilation on; every KV block is free afterwards."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import _vllm_plain as plain  # noqa: E402
from vtw.vllm import _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 16
PROMPTS = [
    ("<image> what shape is in the picture", 0),
    ("what color is the square", None),
    ("<image> is there a circle", 1),
    ("<image> " + " ".join(["describe the shapes and colors"] * 3), 2),
    ("how many shapes", None),
    ("where is the red shape <image> yes", 3),
    ("<image> yes", 4),
]
ABORTED = ("<image> this one is aborted", 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava_onevision(tmp_path_factory.mktemp("tiny_llava_onevision"), layers=LAYERS)


@pytest.fixture(scope="module")
def hf(folder):
    return plain.load_hf(folder)


def _visual(hf):  # the family's config fields, read here (not through vtw)
    return {hf[0].config.image_token_index, hf[0].config.video_token_index}


_REFS = {}  # layer -> reference (the same model for the whole module)


def _reference(hf, layer):
    if layer not in _REFS:
        _REFS[layer] = plain.reference(hf, layer, PROMPTS, NEW, tiny.ov_image, _visual(hf))
    return _REFS[layer]


def _engine(folder, kv, layer, blocks, eager):
    from vllm import LLM

    # blocks of 32 tokens; prefill chunks of 32 tokens split every image (36..88 image tokens)
    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=128,
               max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               limit_mm_per_prompt={"image": 1, "video": 0}, enforce_eager=eager,
               hf_overrides={"vtw_layer": layer, "vtw_kv": kv})


@pytest.fixture(scope="module")
def llm(folder):
    # re-wired to each K between workloads (set_layer needs an eager engine); a 120-token request
    # needs 4 blocks of the 6 usable: requests get preempted
    engine = _engine(folder, "shared", LAYERS // 2, blocks=7, eager=True)
    yield engine
    del engine


def test_engine_start(llm):
    st = _runner.state_of(plain.runner_of(llm))
    assert st is not None and st.settings.layer == LAYERS // 2 and st.settings.family == "LLaVA-OneVision"
    plain.check_runner(st)


@pytest.mark.parametrize("layer", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS])
def test_tokens_equal_withdrawn_model(llm, hf, layer):
    plain.at_layer(llm, layer, lambda: plain.check_workload(llm, _reference(hf, layer), PROMPTS, NEW, tiny.ov_image,
                                                            ABORTED, layer))


def test_text_only_compiled_tokens_equal_withdrawn_model(folder, hf):
    """A second engine: vtw_kv="text_only" at K = 1 (the deep layers in KV groups of their own),
    vLLM's compilation on (its default): decode steps run the compiled graph, steps with image
    tokens run eagerly."""
    # the pool holds a max_model_len request (4 blocks) in each of the 4 KV groups, hardly more
    engine = _engine(folder, "text_only", 1, blocks=4 * 4 + 1, eager=False)
    try:
        plain.check_workload(engine, _reference(hf, 1), PROMPTS, NEW, tiny.ov_image, ABORTED, 1)
        plain.check_compiled(engine)
    finally:
        del engine


def test_withdrawal_changes_image_requests(hf):
    plain.changes_image_requests(_reference(hf, LAYERS), _reference(hf, 1), PROMPTS, _visual(hf))
