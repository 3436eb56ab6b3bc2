"""vtw.vllm with vtw_kv="text_only" (the default) on the tiny LLaVA-1.5: the deep layers live in
KV cache groups of their own whose blocks hold text tokens only. The engine's greedy tokens
equal those of the withdrawn model (the cache-free recomputation of test_vllm_llava, and
vtw.enable's greedy generate on the HF model: two independent references) in the
continuously batched, chunked-prefill, preempting workload with an abort; a request holds fewer
blocks in the deep groups than in the shallow one; every block is free afterwards. One engine
per K (the groups are laid out for the engine's K)."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

from test_vllm_llava import LAYERS, NEW, _reference, folder, hf  # noqa: E402,F401  (fixtures)
from vtw.vllm import tiny  # noqa: E402


def _engine(folder, layer, blocks):
    from vllm import LLM

    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=128,
               max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               hf_overrides={"vtw_layer": layer})  # vtw_kv: text_only by default


def _enable_reference(hf, layer):
    """A second, independent reference: vtw.enable on the HF model (its KV cache, its masks),
    greedy `generate` of NEW tokens, one request at a time."""
    import torch

    import vtw

    model, proc = hf
    vtw.enable(model, layer)
    try:
        out = []
        for text, seed in tiny.PROMPTS:
            inputs = proc(text=text, images=tiny.image(seed) if seed is not None else None, return_tensors="pt")
            with torch.no_grad():
                g = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            n = inputs["input_ids"].shape[1]
            out.append((inputs["input_ids"][0].tolist(), g[0, n:].tolist()))
        return out
    finally:
        vtw.disable(model)


def _groups(llm):
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    return sched.kv_cache_manager.coordinator.single_type_managers


@pytest.mark.parametrize("layer", [1, LAYERS // 2])
def test_text_only_tokens_equal_withdrawn_model(folder, hf, layer):
    from vllm import SamplingParams
    from vtw.vllm._text_only import TextOnlyManager

    # K = 1: four groups of one layer (1 shallow, 3 deep); K = 2: two groups of two (1 + 1). The
    # groups share one pool of blocks; a request of max_model_len (128: 4 blocks) must fit in every
    # group, so the pool is that plus one block: small enough that requests get preempted
    groups = 4 if layer == 1 else 2
    llm = _engine(folder, layer, blocks=groups * 4 + 2)
    try:
        managers = _groups(llm)
        kinds = [isinstance(m, TextOnlyManager) for m in managers]
        assert kinds[0] is False and any(kinds), kinds
        # one image request mid-flight: fewer blocks in the deep groups than in the shallow one
        engine = llm.llm_engine
        engine.add_request("probe", {"prompt": "<image> what shape is in the picture",
                                     "multi_modal_data": {"image": tiny.image(0)}},
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        held = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if held is None and any(len(o.outputs[0].token_ids) for o in outs):
                # the engine core's request id extends the user's
                held = [sum(len(b) for r, b in m.req_to_blocks.items() if r.startswith("probe")) for m in managers]
        shallow = held[0]
        deep = [h for h, k in zip(held, kinds) if k]
        assert shallow == 3 and all(d == 1 for d in deep), held  # 71 tokens: 3 blocks; 7 text tokens: 1

        got, preempted = tiny.run_workload(llm, NEW)
        want = _reference(hf, layer)
        for (gp, gt), (wp, wt) in zip(got, want):
            assert gp == wp
            assert gt == wt, f"text_only, K={layer}: vLLM {gt} != reference {wt}"
        for (gp, gt), (wp, wt) in zip(got, _enable_reference(hf, layer)):
            assert gp == wp
            assert gt == wt, f"text_only, K={layer}: vLLM {gt} != HF vtw.enable {wt}"
        assert preempted > 0, "the workload was meant to preempt a request"
        # at K = 1 the tiny model generates its image token id: such a token is withdrawn too
        # (under Model Runner V2 on the device, in steps that run the compiled graph)
        assert layer != 1 or any(hf[0].config.image_token_id in gt for _, gt in got)
        # vLLM's compilation is on (its default): steps with every token kept ran the compiled
        # graph, steps with visual tokens ran eagerly
        compiles, compiled, eager = tiny.step_paths(llm)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(llm)
        assert free == total, f"{total - free} KV blocks still held after the workload"
    finally:
        del llm
