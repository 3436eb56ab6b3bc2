"""vtw.vllm on a tiny LLaVA-NeXT (AnyRes: the base picture plus 48 x 48 tiles, newline tokens;
every one of them is visual and withdrawn): greedy tokens equal the cache-free recomputation of
the withdrawn model on the HF modules, in both KV modes, under chunked prefill, continuous
batching, preemption and an abort; every KV block is free afterwards."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from test_vllm_llava import _reference as _llava_reference  # noqa: E402
from vtw.vllm import _runner, tiny  # noqa: E402

LAYERS = 4
NEW = 12
PROMPTS = [
    ("<image> what shape is in the picture", 0),
    ("what color is the square", None),
    ("<image> is there a circle", 1),
    ("<image> " + " ".join(["describe the shapes and colors"] * 2), 2),
    ("how many shapes", None),
    ("<image> yes", 3),
]
ABORTED = ("<image> this one is aborted", 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava_next(tmp_path_factory.mktemp("tiny_llava_next"), layers=LAYERS)


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(folder)


def _reference(hf, layer):
    return _llava_reference(hf, layer, PROMPTS, NEW, image=tiny.next_image)


def _engine(folder, kv, layer, blocks, eager=False):
    from vllm import LLM

    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=384,
               max_num_batched_tokens=64, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               enforce_eager=eager, hf_overrides={"vtw_layer": layer, "vtw_kv": kv})


def _check(llm, hf, layer):
    got, preempted = tiny.run_workload(llm, NEW, PROMPTS, image=tiny.next_image, aborted=ABORTED)
    for (gp, gt), (wp, wt), (text, _) in zip(got, _reference(hf, layer), PROMPTS):
        assert gp == wp, f"prompt ids differ for {text!r}"
        assert gt == wt, f"K={layer}, {text!r}: vLLM {gt} != reference {wt}"
    free, total = tiny.free_blocks(llm)
    assert free == total, f"{total - free} KV blocks still held after the workload"
    return preempted


def test_shared_tokens_equal_withdrawn_model(folder, hf):
    # a 350-token request needs 11-12 blocks; re-wired per K (set_layer needs an eager engine)
    llm = _engine(folder, "shared", LAYERS // 2, blocks=13, eager=True)
    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        preempted = 0
        for layer in (LAYERS // 2, 0, LAYERS):
            _runner.set_layer(runner, layer)
            preempted += _check(llm, hf, layer)
        assert preempted > 0
    finally:
        del llm


def test_text_only_tokens_equal_withdrawn_model(folder, hf):
    # (the pool must hold a max_model_len request in each of the 4 groups, too many blocks to
    # preempt here: preemption under text_only is covered by test_vllm_text_only and the Qwen tests)
    llm = _engine(folder, "text_only", 1, blocks=4 * 12 + 2)
    try:
        _check(llm, hf, 1)
    finally:
        del llm
