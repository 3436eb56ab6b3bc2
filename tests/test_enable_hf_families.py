"""vtw.enable on the image-text families added for issue 19 (Qwen3-VL, Qwen3-VL-MoE, Idefics3,
SmolVLM, InternVL, Mistral 3), tiny random models, float32, CPU, eager and SDPA.

The reference here is the *masking definition* of withdrawal, independent of vtw: the unmodified
model on ONE unpadded sample, no cache, with a forward pre-hook on every decoder layer >= K that
takes the mask the model built for that layer (causal; PaliGemma's bidirectional prefix; ...)
and removes every visual key from it (a visual query still sees itself, so no row of the mask is
empty); everything else (vision tower, DeepStack, M-RoPE positions, ...) as the model computes it. Greedy decoding recomputes the whole sequence at
every step. vtw runs batched (left padding, rows with 0, 1 and 2 pictures), with a cache.
"""

from __future__ import annotations

import pytest
import torch

import vtw
from test_enable_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_enable_support import Case as _Case
from test_enable_support import Sample, batch_inputs, enable_vtw_attention_if_present, gen_kwargs, generated

ATTN = ["eager", "sdpa"]
STEPS = 3


class Case(_Case):
    @property
    def text(self):  # Idefics3 / SmolVLM keep the text decoder under .text_model; Phi-4-MM is one
        m = self.model.model
        if hasattr(m, "text_model"):
            return m.text_model
        return m.language_model if hasattr(m, "language_model") else m

    @property
    def suppress(self) -> list[int]:  # visual ids and EOS (Phi-4-MM's config is its text config)
        eos = self.model.config.get_text_config().eos_token_id
        return sorted(set(self.visual_ids) | ({eos} if isinstance(eos, int) else set()))


# ---------------------------------------------------------------------------------------------
# The reference


def _masked_forward(case: Case, K: int, ids: list[int], mm: dict, extra_mask=None, grad=False, n_prompt=None,
                    own_mask=True, **kw) -> torch.Tensor:
    """Logits [n, V] of the unmodified model on one unpadded sequence, in which every decoder
    layer >= K lets no query attend to a visual key (`extra_mask` [n, n] bool, if given, is
    and-ed in: e.g. packed-sequence boundaries). `n_prompt`: the prompt's length (PaliGemma: the
    prompt is the prefix, token type 0; generated tokens are type 1). `own_mask=False`: start
    the layers >= K from a plain causal mask instead of the model's."""
    model = case.model
    text = case.text
    assert not vtw.is_enabled(model)
    ids_t = torch.tensor([ids])
    n = len(ids)
    visual = torch.isin(ids_t[0], torch.tensor(case.visual_ids))
    keep = ~visual[None, :]
    if extra_mask is not None:
        keep = keep & extra_mask
    dtype = next(model.parameters()).dtype
    seen = []

    def pre(module, args, kwargs):
        assert "attention_mask" in kwargs
        own = kwargs["attention_mask"]  # what the model built for this layer: None (causal), bool or additive
        if own is None or not own_mask:
            base = torch.ones(n, n, dtype=torch.bool).tril()
        else:
            assert own.shape[-2:] == (n, n), own.shape
            base = own[0, 0] if own.dtype == torch.bool else own[0, 0] == 0
        allowed = (base & keep) | torch.eye(n, dtype=torch.bool)
        kwargs["attention_mask"] = torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
        seen.append(1)
        return args, kwargs

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in list(text.layers)[K:]]
    try:
        inputs = dict(input_ids=ids_t, **mm)
        if case.extra is not None:
            inputs.update(case.extra(ids_t, torch.ones_like(ids_t)))
        if n_prompt is not None and "token_type_ids" in inputs and case.name == "paligemma":
            inputs["token_type_ids"] = (torch.arange(n) >= n_prompt).long()[None]
        if n_prompt is not None and case.name == "ernie4_5_vl_moe":  # generated tokens: text experts
            inputs["moe_mm_token_type_ids"][:, n_prompt:] = 0
        with torch.set_grad_enabled(grad):
            out = model(**inputs, **kw, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(text.layers) - K
    return out.logits[0]


def ref_greedy(case: Case, K: int, sample: Sample, steps: int):
    tokens, logits = [], []
    for _ in range(steps):
        lg = _masked_forward(case, K, sample.ids + tokens, sample.mm, n_prompt=len(sample.ids))[-1]
        logits.append(lg)
        masked = lg.clone()
        masked[case.suppress] = float("-inf")
        tokens.append(int(masked.argmax()))
    return tokens, logits


def assert_generate_matches(case: Case, K: int, out, inputs, refs, atol=1e-4):
    gen = generated(out, inputs)
    for b, (ref_toks, ref_logits) in enumerate(refs):
        toks = gen[b].tolist()
        assert toks == ref_toks, f"{case.name} K={K} row {b}: generated {toks}, reference {ref_toks}"
        for t in range(len(toks)):
            torch.testing.assert_close(out.logits[t][b], ref_logits[t], atol=atol, rtol=1e-5,
                                       msg=lambda m: f"{case.name} K={K} row {b} step {t}: {m}")


# ---------------------------------------------------------------------------------------------
# Families


def _finish(model, attn):
    model = model.eval()
    model.set_attn_implementation(attn)
    return model


def _mrope_grid_samples(seed: int, patch_shape=(3 * 2 * 2 * 2,)):
    """The samples of the M-RoPE families with a `[T, H, W]` grid per picture (Qwen3-VL, GLM-4V):
    pictures of several shapes between <start>=60 and <end>=61, 2x2 merged into image tokens 62,
    a text-only row, two pictures in one row; `mm_token_type_ids` marks the image tokens. Each patch
    is `patch_shape` (flat for Qwen3-VL / GLM-4V: 3 channels x 2 frames x 2 x 2 pixels; Kimi K2.5
    takes [3, 2, 2])."""
    g = torch.Generator().manual_seed(seed + 1)

    def sample(parts):
        ids, pvs, grids = [], [], []
        for p in parts:
            if isinstance(p, tuple):
                h, w = p
                pvs.append(torch.randn(h * w, *patch_shape, generator=g))
                grids.append((1, h, w))
                ids += [60] + [62] * (h * w // 4) + [61]
            else:
                ids += p
        mm = {"pixel_values": torch.cat(pvs), "image_grid_thw": torch.tensor(grids)} if pvs else {}
        return Sample(ids, mm)

    samples = [
        sample([[1, 5, 6], (4, 4), [7, 8, 9]]),
        sample([[1, 3], (4, 6), [4, 5], (4, 4), [6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1], (6, 4), [13, 14, 15, 16, 17, 18, 19, 20]]),
    ]

    def extra(ids, am):
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[ids == 62] = 1
        return {"mm_token_type_ids": types}

    return samples, extra


def _qwen3_case(name: str, attn: str, seed: int = 0, layers: int = 4) -> Case:
    """Qwen3-VL / Qwen3-VL-MoE: patches of 2x2 pixels x 2 frames merged 2x2, so an image of grid
    (1, h, w) gives h*w/4 image tokens between vision start/end (60, 61); DeepStack injects the
    features of vision layers 0 and 1 after text layers 0 and 1."""
    if name == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config, Qwen3VLForConditionalGeneration as Model

        moe = {}
    else:
        from transformers import Qwen3VLMoeConfig as Config, Qwen3VLMoeForConditionalGeneration as Model

        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    enable_vtw_attention_if_present(attn)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=512,
                initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **moe)
    cfg = Config(vision_config=vision, text_config=text, image_token_id=62, video_token_id=63,
                 vision_start_token_id=60, vision_end_token_id=61)
    torch.manual_seed(seed)
    model = _finish(Model(cfg), attn)
    samples, extra = _mrope_grid_samples(seed)
    return Case(name, model, (62, 63), 0, samples, _cat_mm, extra=extra, mrope=True)


def _cat_mm(ss):
    """Batched multimodal inputs: every key of the samples' own inputs concatenated in order."""
    keys = [k for s in ss for k in s.mm]
    return {k: torch.cat([s.mm[k] for s in ss if k in s.mm]) for k in dict.fromkeys(keys)}


def _llama_text(layers: int) -> dict:
    return dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)


def _idefics3_case(name: str, attn: str, seed: int = 0, layers: int = 4) -> Case:
    """Idefics3 / SmolVLM (decoder under .text_model): 8x8 images, patch 2, pixel shuffle 2 ->
    4 image tokens per image, wrapped in <fake_token_around_image> (58) and <global-img> (59),
    which stay text. Rows with fewer images get all-zero padding images (which the model drops)."""
    if name == "idefics3":
        from transformers import Idefics3Config as Config, Idefics3ForConditionalGeneration as Model
    else:
        from transformers import SmolVLMConfig as Config, SmolVLMForConditionalGeneration as Model
    enable_vtw_attention_if_present(attn)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=2)
    cfg = Config(vision_config=vision, text_config=_llama_text(layers), image_token_id=63, scale_factor=2,
                 pad_token_id=0)
    torch.manual_seed(seed)
    model = _finish(Model(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)
    n_tok = model.model.image_seq_len
    assert n_tok == 4

    def sample(parts):
        ids, pvs = [], []
        for p in parts:
            if p == "img":
                pvs.append(torch.randn(3, 8, 8, generator=g))
                ids += [58, 59] + [63] * n_tok + [58]
            else:
                ids += p
        return Sample(ids, {"pixel_values": torch.stack(pvs)[None]} if pvs else {})

    samples = [
        sample([[1, 5, 6], "img", [7, 8, 9]]),
        sample([[1, 3], "img", [4, 5], "img", [6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1], "img", [13, 14, 15, 16, 17, 18, 19, 20]]),
    ]

    def batch_mm(ss):
        pvs = [s.mm["pixel_values"][0] if s.mm else torch.zeros(0, 3, 8, 8) for s in ss]
        n = max(p.shape[0] for p in pvs)
        if n == 0:
            return {}
        out = torch.zeros(len(ss), n, 3, 8, 8)
        for b, p in enumerate(pvs):
            out[b, : p.shape[0]] = p
        return {"pixel_values": out}

    return Case(name, model, (63,), 0, samples, batch_mm)


def _internvl_case(attn: str, seed: int = 0, layers: int = 4) -> Case:
    """InternVL (Qwen2 text decoder): 8x8 images, patch 2, pixel shuffle 0.5 -> image tokens per
    image read from the model's get_image_features, between <img> (58) and </img> (59)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[8, 8],
                  patch_size=[2, 2])
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=63, downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        n_tok = model.model.get_image_features(torch.zeros(1, 3, 8, 8)).pooler_output.shape[1]

    def sample(parts):
        ids, pvs = [], []
        for p in parts:
            if p == "img":
                pvs.append(torch.randn(3, 8, 8, generator=g))
                ids += [58] + [63] * n_tok + [59]
            else:
                ids += p
        return Sample(ids, {"pixel_values": torch.stack(pvs)} if pvs else {})

    samples = [
        sample([[1, 5, 6], "img", [7, 8, 9]]),
        sample([[1, 3], "img", [4, 5], "img", [6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1], "img", [13, 14, 15, 16, 17, 18, 19, 20]]),
    ]
    return Case("internvl", model, (63,), 0, samples, _cat_mm)


def _mistral3_case(attn: str, seed: int = 0, layers: int = 4) -> Case:
    """Mistral 3 (Pixtral vision, Mistral text): an 8x8 image, patch 2, merged 2x2, gives a 2x2 grid
    of [IMG] tokens (63), each row closed by [IMG_BREAK] (58), the last by [IMG_END] (59), which
    stay text."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=2, head_dim=16)
    text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2, sliding_window=None)
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_index=63, spatial_merge_size=2)
    torch.manual_seed(seed)
    model = _finish(Mistral3ForConditionalGeneration(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        n_feat = model.model.get_image_features(torch.zeros(1, 3, 8, 8), image_sizes=torch.tensor([[8, 8]]))
    n_feat = (n_feat.pooler_output if hasattr(n_feat, "pooler_output") else n_feat)[0].shape[0]
    assert n_feat == 4
    img = [63, 63, 58, 63, 63, 59]

    def sample(parts):
        ids, pvs = [], []
        for p in parts:
            if p == "img":
                pvs.append(torch.randn(3, 8, 8, generator=g))
                ids += img
            else:
                ids += p
        mm = {"pixel_values": torch.stack(pvs), "image_sizes": torch.tensor([[8, 8]] * len(pvs))} if pvs else {}
        return Sample(ids, mm)

    samples = [
        sample([[1, 5, 6], "img", [7, 8, 9]]),
        sample([[1, 3], "img", [4, 5], "img", [6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1], "img", [13, 14, 15, 16, 17, 18, 19, 20]]),
    ]
    return Case("mistral3", model, (63,), 0, samples, _cat_mm)


def _glm4v_case(attn: str, seed: int = 0, layers: int = 4) -> Case:
    """GLM-4V: as Qwen2-VL (patches 2x2 x 2 frames merged 2x2, 3-D M-RoPE from get_rope_index),
    images between <|begin_of_image|> (60) and <|end_of_image|> (61)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "partial_rotary_factor": 1.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = Glm4vConfig(vision_config=vision, text_config=text, image_token_id=62, video_token_id=63,
                      image_start_token_id=60, image_end_token_id=61, video_start_token_id=58, video_end_token_id=59)
    torch.manual_seed(seed)
    model = _finish(Glm4vForConditionalGeneration(cfg), attn)
    samples, extra = _mrope_grid_samples(seed)
    return Case("glm4v", model, (62, 63), 0, samples, _cat_mm, extra=extra, mrope=True)


def _boi_eoi_samples(seed: int):
    """The samples of the families whose 8x8 picture becomes 4 image tokens 63 between <boi>=58 and
    <eoi>=59 (Gemma 3, Aya Vision): a picture mid-row, two in one row, a text-only row."""
    g = torch.Generator().manual_seed(seed + 1)

    def sample(parts):
        ids, pvs = [], []
        for p in parts:
            if p == "img":
                pvs.append(torch.randn(3, 8, 8, generator=g))
                ids += [58] + [63] * 4 + [59]
            else:
                ids += p
        return Sample(ids, {"pixel_values": torch.stack(pvs)} if pvs else {})

    samples = [
        sample([[1, 5, 6], "img", [7, 8, 9]]),
        sample([[1, 3], "img", [4, 5], "img", [6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1], "img", [13, 14, 15, 16, 17, 18, 19, 20]]),
    ]
    return samples


def _gemma3_case(attn: str, seed: int = 0) -> Case:
    """Gemma 3: layers sliding, full, sliding, full (window 4, shorter than the prompts); 8x8
    images, patch 2, pooled to 4 image tokens (63) between <start_of_image> (58) and
    <end_of_image> (59); token_type_ids mark the image tokens (bidirectional within an image in the
    layers < K, as the model computes it)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, initializer_range=0.2, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"] * 2)
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_index=63,
                       boi_token_index=58, eoi_token_index=59)
    torch.manual_seed(seed)
    model = _finish(Gemma3ForConditionalGeneration(cfg), attn)
    samples = _boi_eoi_samples(seed)

    def extra(ids, am):
        return {"token_type_ids": (ids == 63).long()}

    return Case("gemma3", model, (63,), 0, samples, _cat_mm, extra=extra)


def _paligemma_case(attn: str, seed: int = 0, layers: int = 4) -> Case:
    """PaliGemma (SigLIP, Gemma): 8x8 images, patch 2 -> 16 image tokens (63), first in the
    prompt as the processor puts them; the whole prompt is the prefix (token_type_ids 0: it
    attends bidirectionally within itself), generated tokens are causal (type 1)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=2)
    text = dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=63, projection_dim=32)
    torch.manual_seed(seed)
    model = _finish(PaliGemmaForConditionalGeneration(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)
    I = [63] * 16

    def sample(n_img, text_ids):
        mm = {"pixel_values": torch.randn(n_img, 3, 8, 8, generator=g)} if n_img else {}
        return Sample(I * n_img + [1] + text_ids + [10], mm)

    samples = [sample(1, [5, 6, 7, 8, 9]), sample(2, [3, 4]), sample(0, [11, 12]),
               sample(1, [13, 14, 15, 16, 17, 18, 19, 20])]

    def extra(ids, am):
        return {"token_type_ids": torch.zeros_like(ids)}

    return Case("paligemma", model, (63,), 0, samples, _cat_mm, extra=extra)


def _kimi_case(attn: str, seed: int = 0, layers: int = 4) -> Case:
    """Kimi K2.5 (MoonViT, DeepSeek-V3 text: MLA attention, MoE from layer 1): patches of 2x2
    pixels merged 2x2, so an image of grid (1, h, w) gives h*w/4 image tokens (62) between
    vision start/end (60, 61)."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=2,
                  pos_emb_height=8, pos_emb_width=8, pos_emb_time=2, merge_kernel_size=[2, 2])
    text = dict(model_type="deepseek_v3", hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=64, n_group=1, topk_group=1,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = Kimi_K25Config(vision_config=vision, text_config=text, projection_hidden_size=32, image_token_id=62,
                         video_token_id=63, vision_start_token_id=60, vision_end_token_id=61)
    torch.manual_seed(seed)
    model = _finish(Kimi_K25ForConditionalGeneration(cfg), attn)
    samples, _ = _mrope_grid_samples(seed, patch_shape=(3, 2, 2))
    return Case("kimi_k25", model, (62, 63), 0, samples, _cat_mm)


def _aya_vision_case(attn: str, seed: int = 0) -> Case:
    """Aya Vision (SigLIP, Cohere2 text: sliding-window layers with rotary, full-attention layers
    without): 8x8 images, patch 2, pixel shuffle 2 -> 4 image tokens (63) between 58 and 59."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=8, patch_size=2)
    text = dict(model_type="cohere2", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, initializer_range=0.2, sliding_window=4,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    cfg = AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=63, downsample_factor=2)
    torch.manual_seed(seed)
    model = _finish(AyaVisionForConditionalGeneration(cfg), attn)
    samples = _boi_eoi_samples(seed)
    return Case("aya_vision", model, (63,), 0, samples, _cat_mm)


BUILDERS = {
    "qwen3_vl": lambda attn: _qwen3_case("qwen3_vl", attn),
    "qwen3_vl_moe": lambda attn: _qwen3_case("qwen3_vl_moe", attn),
    "idefics3": lambda attn: _idefics3_case("idefics3", attn),
    "smolvlm": lambda attn: _idefics3_case("smolvlm", attn),
    "internvl": _internvl_case,
    "mistral3": _mistral3_case,
    "glm4v": _glm4v_case,
    "paligemma": _paligemma_case,
    "kimi_k25": _kimi_case,
    "aya_vision": _aya_vision_case,
}


@pytest.fixture(scope="module", params=[(f, a) for f in BUILDERS for a in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    family, attn = request.param
    c = BUILDERS[family](attn)
    c.refs = {}
    return c


def _refs(case, K):
    if K not in case.refs:
        case.refs[K] = [ref_greedy(case, K, s, STEPS) for s in case.samples]
    return case.refs[K]


def test_family_is_registered(case):
    from vtw.models import resolve

    w = resolve(case.model)
    assert w.family == case.name
    assert w.token_ids == case.visual_ids
    assert w.text_model is case.text


def test_reference_is_not_vacuous(case):
    # Withdrawal must change the logits of the samples with pictures, and leave a text-only one alone.
    L = len(case.text.layers)
    for s in case.samples:
        full = _masked_forward(case, L, s.ids, s.mm)[-1]
        cut = _masked_forward(case, 1, s.ids, s.mm)[-1]
        if any(t in case.visual_ids for t in s.ids):
            assert (full - cut).abs().max() > 1e-3, case.name
        else:
            torch.testing.assert_close(full, cut, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [0, 1, 2, 4])
def test_greedy_generate_matches_reference(case, K):
    inputs = batch_inputs(case)
    refs = _refs(case, K)
    vtw.enable(case.model, K)
    try:
        with torch.no_grad():
            out = case.model.generate(**inputs, **gen_kwargs(case, STEPS))
    finally:
        vtw.disable(case.model)
    assert_generate_matches(case, K, out, inputs, refs)


def test_static_cache_generate_matches_reference(case):
    inputs = batch_inputs(case)
    refs = _refs(case, 1)
    vtw.enable(case.model, 1)
    try:
        with torch.no_grad():
            out = case.model.generate(**inputs, **gen_kwargs(case, STEPS, cache_implementation="static"))
    finally:
        vtw.disable(case.model)
    assert_generate_matches(case, 1, out, inputs, refs)


@pytest.mark.parametrize("attn", ATTN)
def test_gemma3_sliding_window_layers_match_reference(attn):
    # Gemma 3 at every K: its sliding-window layers >= K attend to the kept tokens whose ORIGINAL
    # position is within the window (window 4, shorter than every prompt with a picture), with the
    # local rotary of their layer type; the full-attention ones see every kept token.
    c = _gemma3_case(attn)
    c.refs = {}
    assert vtw.models.resolve(c.model).token_ids == (63,)
    inputs = batch_inputs(c)
    for K in (0, 1, 2, 3, 4):
        refs = _refs(c, K)
        vtw.enable(c.model, K)
        try:
            with torch.no_grad():
                out = c.model.generate(**inputs, **gen_kwargs(c, STEPS))
        finally:
            vtw.disable(c.model)
        assert_generate_matches(c, K, out, inputs, refs)
    full, cut = _refs(c, 4), _refs(c, 1)
    assert max((a - b).abs().max() for a, b in zip(full[0][1], cut[0][1])) > 1e-3  # withdrawal changes row 0
    # a static cache too (its deep sliding layers get full static layers)
    for K in (0, 1):
        vtw.enable(c.model, K)
        try:
            with torch.no_grad():
                out = c.model.generate(**inputs, **gen_kwargs(c, STEPS, cache_implementation="static"))
        finally:
            vtw.disable(c.model)
        assert_generate_matches(c, K, out, inputs, _refs(c, K))


def test_float64_is_exact_to_rounding():
    # In double precision the withdrawn model and the masking-definition reference agree to ~1e-15
    # (Qwen3-VL, DeepStack included): what the float32 tests accept at 1e-4 is rounding, not a
    # different computation. SDPA: eager attention takes its softmax in float32 even in a float64
    # model (transformers). Only Qwen3-VL here: the unmodified Idefics3 already differs by 1e-6
    # between a left-padded batch and a single sample in float64 (measured with K = L).
    c = BUILDERS["qwen3_vl"]("sdpa")
    c.model.double()
    for s in c.samples:
        s.mm = {k: v.double() if v.is_floating_point() else v for k, v in s.mm.items()}
    inputs = batch_inputs(c)
    K = 1
    refs = [ref_greedy(c, K, s, 2) for s in c.samples]
    vtw.enable(c.model, K)
    try:
        with torch.no_grad():
            out = c.model.generate(**inputs, **gen_kwargs(c, 2))
            last = c.model(**inputs, use_cache=False).logits[:, -1]  # generate returns float32 logits
    finally:
        vtw.disable(c.model)
    assert last.dtype == torch.float64
    assert generated(out, inputs).tolist() == [toks for toks, _ in refs]
    for b, (_, ref_logits) in enumerate(refs):
        torch.testing.assert_close(last[b], ref_logits[0], atol=1e-10, rtol=0, msg=lambda m: f"row {b}: {m}")


def test_paligemma_new_picture_over_a_filled_cache_is_refused():
    from transformers import DynamicCache

    from vtw.compat.transformers import cache_kwargs

    c = _paligemma_case("sdpa")
    s = c.samples[0]
    ids = torch.tensor([s.ids])
    vtw.enable(c.model, 1)
    try:
        cache = DynamicCache(config=c.model.config)
        with torch.no_grad():
            c.model(input_ids=ids, **s.mm, token_type_ids=torch.zeros_like(ids), **cache_kwargs(cache), use_cache=True)
            with pytest.raises(NotImplementedError, match="pixel_values over a filled cache"):
                c.model(input_ids=ids, **s.mm, token_type_ids=torch.zeros_like(ids),
                        attention_mask=torch.ones(1, 2 * ids.shape[1], dtype=torch.long), **cache_kwargs(cache),
                        use_cache=True)
    finally:
        vtw.disable(c.model)


@pytest.mark.parametrize("attn", ATTN)
def test_phi4_multimodal_image_tokens_are_withdrawn(attn):
    # Phi-4-multimodal: the decoder itself merges the vision features, and the image token id is
    # vision_config.image_token_id (audio tokens, 62, stay). Without the vision tower here (its
    # HD-crop inputs are beyond a tiny test): the image-token positions carry their token
    # embeddings, which withdrawal treats like any visual token; exact at every K.
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=2, crop_size=8, image_token_id=63)
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
                 depthwise_separable_out_channel=32, nemo_conv_channels=32, input_size=16, audio_token_id=62)
    cfg = Phi4MultimodalConfig(vision_config=vision, audio_config=audio, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                               max_position_embeddings=256, original_max_position_embeddings=256, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    model = _finish(Phi4MultimodalForCausalLM(cfg), attn)
    I = [63] * 6
    samples = [Sample([1, 5, 6] + I + [7, 8, 9]), Sample([1, 3] + I + [4, 62, 62, 5] + I + [6]),
               Sample([1, 10, 11, 12]), Sample([1] + I + [13, 14, 15, 16, 17, 18, 19, 20])]
    c = Case("phi4_multimodal", model, (63,), 0, samples, _cat_mm)
    c.refs = {}
    w = vtw.models.resolve(model)
    assert (w.family, w.token_ids, w.text_model) == ("phi4_multimodal", (63,), model.model)
    inputs = batch_inputs(c)
    for K in (0, 2, 4):
        refs = _refs(c, K)
        vtw.enable(model, K)
        try:
            with torch.no_grad():
                out = model.generate(**inputs, **gen_kwargs(c, STEPS))
        finally:
            vtw.disable(model)
        assert_generate_matches(c, K, out, inputs, refs)
    assert max((a - b).abs().max() for a, b in zip(_refs(c, 4)[0][1], _refs(c, 0)[0][1])) > 1e-3


@pytest.mark.parametrize("attn", ATTN)
def test_ernie_vl_routing_types_are_gathered(attn):
    # ERNIE-4.5-VL-MoE: every layer routes each token to its text or vision experts by
    # moe_mm_token_type_ids ([B, S]); vtw gathers it with the hidden states. Here a text token (7)
    # is also typed 1 (vision experts), so the deep layers only match the reference if the types
    # travel with the kept tokens. Without the vision tower (image-token positions carry their
    # token embeddings).
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                moe_num_experts=2, moe_k=1, moe_intermediate_size=[32, 32], initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2)
    torch.manual_seed(0)
    model = _finish(Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(
        vision_config=vision, text_config=text, image_token_id=63, video_token_id=62)), attn)
    I = [63] * 6
    samples = [Sample([1, 5, 6] + I + [7, 8, 9]), Sample([1, 3] + I + [4, 7, 5] + I + [6]),
               Sample([1, 10, 11, 7]), Sample([1] + I + [13, 14, 7, 16, 17, 18, 19, 20])]

    def extra(ids, am):
        return {"moe_mm_token_type_ids": ((ids == 63) | (ids == 7)).int()}

    c = Case("ernie4_5_vl_moe", model, (62, 63), 0, samples, _cat_mm, extra=extra)
    c.refs = {}
    assert vtw.models.resolve(model).family == "ernie4_5_vl_moe"
    inputs = batch_inputs(c)
    for K in (0, 2, 4):
        refs = _refs(c, K)
        vtw.enable(model, K)
        try:
            with torch.no_grad():
                out = model.generate(**inputs, **gen_kwargs(c, STEPS))
        finally:
            vtw.disable(model)
        assert_generate_matches(c, K, out, inputs, refs)
    # the types matter in the deep layers: typing token 7 as text changes the reference
    s0 = samples[0]
    typed = _masked_forward(c, 0, s0.ids, {})[-1]
    c.extra = lambda ids, am: {"moe_mm_token_type_ids": (ids == 63).int()}
    assert (typed - _masked_forward(c, 0, s0.ids, {})[-1]).abs().max() > 1e-3


def _qwen3_5_case(attn: str, seed: int = 0) -> Case:
    """Qwen3.5 (layers linear attention, full, linear attention, full; M-RoPE as Qwen3-VL)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, vocab_size=64, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True, "partial_rotary_factor": 1.0},
                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"] * 2,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = Qwen3_5Config(vision_config=vision, text_config=text, image_token_id=62, video_token_id=63,
                        vision_start_token_id=60, vision_end_token_id=61)
    torch.manual_seed(seed)
    model = _finish(Qwen3_5ForConditionalGeneration(cfg), attn)
    c = _qwen3_case("qwen3_vl", attn)  # the same prompts and pictures (patch 2x2 x 2 frames, merged 2x2)
    return Case("qwen3_5", model, (62, 63), 0, c.samples, _cat_mm, extra=c.extra, mrope=True)


@pytest.mark.parametrize("attn", ATTN)
def test_qwen3_5_after_its_last_linear_attention_layer_matches_reference(attn):
    # Qwen3.5's linear-attention (recurrent) layers have no per-token keys: refused from K on, so
    # K >= 3 here (after the last one); exact there.
    c = _qwen3_5_case(attn)
    c.refs = {}
    assert vtw.models.resolve(c.model).family == "qwen3_5"
    for K in (0, 1, 2):
        with pytest.raises(NotImplementedError, match=r"is 'linear_attention' .*layer must be >= 3"):
            vtw.enable(c.model, K)
    inputs = batch_inputs(c)
    for K in (3, 4):
        refs = _refs(c, K)
        vtw.enable(c.model, K)
        try:
            with torch.no_grad():
                out = c.model.generate(**inputs, **gen_kwargs(c, STEPS))
        finally:
            vtw.disable(c.model)
        assert_generate_matches(c, K, out, inputs, refs)
    assert max((a - b).abs().max() for a, b in zip(_refs(c, 4)[0][1], _refs(c, 3)[0][1])) > 1e-3


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "packed"])
def test_no_sync_inside_the_layers_for_the_new_masks(family):
    # The sliding window over original positions, PaliGemma's gathered prefix and the packed
    # sequence boundaries are built on the device: no op that reads tensor data back to the host
    # runs from layer K's call to the last layer's return (test_enable_sync.py's recorder), in a
    # prefill and in decode steps.
    from test_enable_support import llava_case
    from test_enable_sync import _Recorder, _span_hooks

    K = 1
    if family == "gemma3":
        c = _gemma3_case("sdpa")
    elif family == "paligemma":
        c = _paligemma_case("sdpa")
    else:
        c = llava_case("sdpa")
    rec, seen = _Recorder(), []

    def enter():
        rec.inside = True
        seen.append(1)

    def leave():
        rec.inside = False

    layers = c.text.layers
    hooks = _span_hooks(layers[K:], enter, leave)
    vtw.enable(c.model, K)
    try:
        with rec, torch.no_grad():
            if family == "packed":
                a, b = c.samples[0], c.samples[1]
                pos = torch.cat([torch.arange(len(a.ids)), torch.arange(len(b.ids))])[None]
                c.model(input_ids=torch.tensor([a.ids + b.ids]), position_ids=pos, use_cache=False,
                        pixel_values=torch.cat([a.mm["pixel_values"], b.mm["pixel_values"]]))
            else:
                c.model.generate(**batch_inputs(c), **gen_kwargs(c, 3))
    finally:
        vtw.disable(c.model)
        for h in hooks:
            h.remove()
    assert len(seen) == (1 if family == "packed" else 3)
    assert rec.found == [], f"syncing ops inside the decoder layers: {sorted(set(rec.found))}"
