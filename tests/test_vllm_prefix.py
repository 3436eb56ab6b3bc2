"""vtw.vllm with vLLM's prefix caching on (its default), both KV modes: the engine's greedy tokens
equal the cache-free withdrawn reference in a workload built to hit the cache (a shared system
prompt of two blocks before the picture, the same picture and prompt again, a second picture after
the same system prompt, follow-up turns that extend an earlier prompt and its answer, one of them a
text-only conversation), with continuous batching and preemption; the hits really happen (vLLM's
per-request count of prefix-cached tokens), none reaches past the request's first visual token
(that is the rule that keeps them exact), and every block is free afterwards."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

import torch  # noqa: E402

from test_vllm_llava import LAYERS, _embeds, _withdrawn_logits, folder, hf  # noqa: E402,F401  (fixtures)
from vtw.embedded import build  # noqa: E402
from vtw.vllm import tiny  # noqa: E402

NEW = 32
BS = 32
SYS = " ".join(["describe the shapes and colors"] * 14)  # 70 words: with BOS, two full blocks of 32 and more
TEXT = SYS + " " + " ".join(["how many shapes"] * 10)  # a text-only prompt of 101 tokens: three full blocks


def _engine(folder, layer, kv, blocks):
    from vllm import LLM

    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=256,
               max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=BS, num_gpu_blocks_override=blocks,
               enable_prefix_caching=True, hf_overrides={"vtw_layer": layer, "vtw_kv": kv})


def _collapse(ids):
    """Token ids with each run of image tokens folded back to the one placeholder vLLM expands."""
    return [t for i, t in enumerate(ids) if t != build.IMAGE_ID or i == 0 or ids[i - 1] != build.IMAGE_ID]


class _Req:
    """A request: `text` (with an optional picture of seed `seed`) through the processor, then
    `extra` token ids (an earlier answer and a follow-up question)."""

    def __init__(self, hf, text, seed, extra=()):
        model, proc = hf
        self.seed, self.extra = seed, list(extra)
        self.inputs = proc(text=text, images=tiny.image(seed) if seed is not None else None, return_tensors="pt")
        self.ids = self.inputs["input_ids"][0].tolist() + self.extra  # expanded, as the engine sees them

    def prompt(self):
        p = {"prompt_token_ids": _collapse(self.inputs["input_ids"][0].tolist()) + self.extra}
        if self.seed is not None:
            p["multi_modal_data"] = {"image": tiny.image(self.seed)}
        return p

    def first_visual(self):
        return next((i for i, t in enumerate(self.ids) if t == build.IMAGE_ID), None)


@torch.no_grad()
def _reference(hf, layer, req):
    """Greedy tokens of the withdrawn model, recomputed from scratch at every step."""
    model, _ = hf
    emb = model.model.language_model.embed_tokens
    embeds = _embeds(model, req.inputs)
    if req.extra:  # appended ids are embedded as tokens (as the engine does; an image id among them is withdrawn)
        embeds = torch.cat([embeds, emb(torch.tensor([req.extra]))], 1)
    ids = torch.tensor([req.ids])
    toks = []
    for _ in range(NEW):
        t = int(_withdrawn_logits(model, embeds, ids, layer).argmax())
        toks.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
        embeds = torch.cat([embeds, emb(torch.tensor([[t]]))], 1)
    return toks


def _run(llm, reqs):
    """Requests arrive two at first, then one every other step; returns, per request, (prompt ids,
    generated ids, prefix-cached tokens), and the number of preemptions."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    pending = [(f"q{id(r)}-{i}", r) for i, r in enumerate(reqs)]
    names = [n for n, _ in pending]
    done, steps = {}, 0
    with tiny.preemptions(llm) as preempted:
        while pending or engine.has_unfinished_requests():
            if pending and (steps == 0 or steps % 2 == 1):
                for _ in range(2 if steps == 0 else 1):
                    if pending:
                        n, r = pending.pop(0)
                        engine.add_request(n, r.prompt(), sp)
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = (list(o.prompt_token_ids), list(o.outputs[0].token_ids),
                                          int(o.num_cached_tokens or 0))
            steps += 1
            assert steps < 3000, "the engine did not finish"
    return [done[n] for n in names], len(preempted)


@pytest.mark.parametrize("kv,layer,blocks", [("shared", LAYERS // 2, 11), ("text_only", 1, 35)])
def test_prefix_caching_exact_and_hit(folder, hf, kv, layer, blocks):
    llm = _engine(folder, layer, kv, blocks)
    try:
        vc = llm.llm_engine.vllm_config
        assert vc.cache_config.enable_prefix_caching is True  # vtw leaves it on
        if kv == "text_only":  # the start-up figure: requests of max_model_len with one picture that fit
            from vtw.vllm import _config, _text_only

            kvc = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
            per_stock, per_vtw = 4 * (256 // BS), 256 // BS + 3 * ((256 - 64) // BS)  # 1 shallow + 3 deep groups
            assert vc.cache_config.kv_cache_max_concurrency == pytest.approx(blocks / per_stock)  # vLLM's figure
            fit = _text_only.requests_that_fit(kvc, 256, 64, vc)
            assert fit == pytest.approx(blocks / per_vtw)
            msg = _text_only.log_capacity(vc, kvc, _config.settings(vc.model_config))
            assert f"{fit:.2f} requests of 256 tokens with one 64-token picture each" in msg, msg
        first = [_Req(hf, SYS + " <image> what shape is in the picture", 0),
                 _Req(hf, TEXT, None),
                 _Req(hf, SYS + " <image> is there a circle", 1),
                 _Req(hf, "<image> yes", 3)]
        got1, pre1 = _run(llm, first)
        # second turn: the same picture and prompt again, a follow-up of the image conversation
        # and of the text-only one (earlier prompt + its answer + a new question), another
        # question on a repeated picture after the system prompt
        q = hf[1].tokenizer
        more = q(" what color is the square", add_special_tokens=False)["input_ids"]
        second = [_Req(hf, TEXT, None, extra=got1[1][1] + more),
                  _Req(hf, SYS + " <image> what shape is in the picture", 0, extra=got1[0][1] + more),
                  _Req(hf, SYS + " <image> what shape is in the picture", 0),
                  _Req(hf, SYS + " <image> where is the red shape", 0)]
        got2, pre2 = _run(llm, second)
        reqs, got = first + second, got1 + got2
        for i, (r, (gp, gt, cached)) in enumerate(zip(reqs, got)):
            assert gp == r.ids, f"request {i}: prompt ids differ"
            want = _reference(hf, layer, r)
            assert gt == want, f"{kv}, K={layer}, request {i} ({cached} tokens from the prefix cache): " \
                               f"vLLM {gt} != reference {want}"
            fv = r.first_visual()
            assert fv is None or cached <= fv, f"request {i}: a hit of {cached} tokens reaches past the first " \
                                               f"visual token at {fv}"
        hits = [c for _, _, c in got]
        # the system prompt (two full blocks before the picture) is reused by every later request
        # that starts with it; the text-only follow-up reuses its earlier turn beyond the system
        # prompt, up to the first generated image token if the answer had one
        assert all(h >= 2 * BS for h in hits[4:]), hits
        t = second[0]
        fv = t.first_visual()
        reach = min(len(t.ids) - 1, fv if fv is not None else len(t.ids))
        assert 3 * BS <= hits[4] <= reach, (hits, reach)
        assert pre1 + pre2 > 0, "the workload was meant to preempt a request"
        # vLLM's compilation on (its default): decode and text-only steps compiled, picture steps eager
        compiles, compiled, eager = tiny.step_paths(llm)
        assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)
        free, total = tiny.free_blocks(llm)
        assert free == total, f"{total - free} KV blocks still held after the workload"
    finally:
        del llm
