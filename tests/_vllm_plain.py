"""The exactness checks the vtw.vllm family modules share: loading the HF model, the engine's
runner, the workload compared with a reference and every KV block free afterwards, a shared engine
re-wired to one K for one workload, a compiling engine's step paths; and, for the plain causal
decoders with their own visual token ids (LLaVA-OneVision, InternVL in the HF format), one
withdrawn-model reference recomputed cache-free on the Hugging Face modules.

The reference is the paper's algorithm written out on the HF language model: layers < K on
every token, layers >= K on the kept tokens only at their original (1-D) positions, the last
position's logits (its early-exit value if it is visual). Which ids are visual is given by the
test module from the family's config fields (not from vtw's reading of them); a generated token
with a visual id is withdrawn too, as in vtw.enable.
"""

import os

import torch

from vtw.vllm import _config, _runner, tiny


def load_hf(folder, attn="sdpa", eos=True):
    """(model, processor) of the tiny model in `folder`, float32; eos=False: generation never stops
    early (the reference generates a fixed number of tokens)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()
    if not eos:
        model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(folder)


def runner_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def check_runner(st):
    """vtw is wired into the runner this process asked vLLM for (MRv2 under VLLM_USE_V2_MODEL_RUNNER=1)."""
    mrv2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
    assert ("Model Runner V2" in st.runner_name) == mrv2, st.runner_name


def at_layer(llm, layer, run):
    """Runs run() with the (eager, shared) engine re-wired to K = `layer`, then back to the engine's
    own vtw_layer; returns (run()'s result, the state it ran with: None at K = L)."""
    runner = runner_of(llm)
    _runner.set_layer(runner, layer)
    try:
        out = run()
        st = _runner.state_of(runner)
    finally:
        _runner.set_layer(runner, _config.settings(runner.model_config).layer)
    return out, st


def check_compiled(engine):
    """A compiling engine ran both compiled steps (every token kept) and eager ones (visual tokens)."""
    compiles, compiled, eager = tiny.step_paths(engine)
    assert compiles and compiled > 0 and eager > 0, (compiles, compiled, eager)


class _Stop(Exception):
    pass


@torch.no_grad()
def lm_inputs_embeds(model, inputs):
    """The language model's input embeddings (image features scattered in), as HF computes them."""
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


@torch.no_grad()
def withdrawn_next(model, embeds, ids, layer, visual):
    """Greedy next token of the withdrawn model, cache-free (see the module docstring)."""
    lm = model.model.language_model
    pos = torch.arange(embeds.shape[1])[None]
    h = embeds
    for i in range(layer):
        h = lm.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
    if layer < len(lm.layers):
        keep = torch.tensor([int(t) not in visual for t in ids])
        if keep[-1]:
            h, pos = h[:, keep], pos[:, keep]
            for i in range(layer, len(lm.layers)):
                h = lm.layers[i](h, attention_mask=None, position_ids=pos,
                                 position_embeddings=lm.rotary_emb(h, pos))
    return int(model.lm_head(lm.norm(h[:, -1:]))[0, -1].argmax())


def reference(hf, layer, prompts, new_tokens, image, visual):
    """[(prompt ids, greedy tokens)] of the withdrawn model at `layer`, every step from scratch."""
    model, proc = hf
    emb = model.model.language_model.embed_tokens
    out = []
    for text, seed in prompts:
        inputs = proc(text=text, images=image(seed) if seed is not None else None, return_tensors="pt")
        ids = inputs["input_ids"][0]
        embeds = lm_inputs_embeds(model, inputs)
        toks = []
        for _ in range(new_tokens):
            t = withdrawn_next(model, embeds, ids, layer, visual)
            toks.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
            with torch.no_grad():
                embeds = torch.cat([embeds, emb(torch.tensor([[t]]))], 1)
        out.append((inputs["input_ids"][0].tolist(), toks))
    return out


def check_workload(llm, want, prompts, new_tokens, image, aborted, layer):
    """Runs tiny.run_workload on `llm` and compares it with `want` (the reference at `layer`); the
    workload must have preempted a request, and every KV block must be free afterwards. Returns
    the engine's (prompt ids, tokens) per prompt."""
    got, preempted = tiny.run_workload(llm, new_tokens, prompts, image=image, aborted=aborted)
    for (gp, gt), (wp, wt), (text, _) in zip(got, want, prompts):
        assert gp == wp, f"prompt ids differ for {text!r}"
        assert gt == wt, f"K={layer}, {text!r}: vLLM {gt} != reference {wt}"
    assert preempted > 0, "the workload was meant to preempt a request"
    free, total = tiny.free_blocks(llm)
    assert free == total, f"{total - free} KV blocks still held after the workload"
    return got


def changes_image_requests(full, withdrawn, prompts, visual):
    """Withdrawal changed some image request's tokens, and no text-only request's (unless that
    one generated a visual id, which is withdrawn as well)."""
    assert any(a[1] != b[1] for a, b, (_, s) in zip(full, withdrawn, prompts) if s is not None)
    assert all(a[1] == b[1] for a, b, (_, s) in zip(full, withdrawn, prompts)
               if s is None and not visual & set(a[1]))
