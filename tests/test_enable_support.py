"""Shared pieces of the tests of vtw.enable (tests/test_enable_*.py); no tests here.

- Tiny random-weight models of each family, built from configs (no downloads, no processors).
- Prompts built by hand: each image contributes exactly the number of image tokens the model's
  code expects (read from each modeling file), and batches are left-padded.
- An independent reference of the paper's algorithm on ONE unpadded sample, without any cache:
  layers < K on the whole sequence, then the visual positions are dropped (boolean indexing),
  then layers >= K on the text tokens with their original position ids. It calls the decoder
  layers through their class (``type(layer).forward``), so it never goes through vtw's patches,
  and recomputes the whole sequence at every generated token.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch

import vtw
from vtw.compat.transformers import VIDEO_LLAVA_IMAGES_KW, cache_kwargs, onevision_video_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread. On a shared 2-core machine, OpenMP threads that
    wait for each other make every small matmul ~100x slower (measured: 500 tiny Linear calls,
    5 s with 2 threads, 0.06 s with 1). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def enabled(case):
    """Enables withdrawal on the requesting module's `case` model; disables it after the test."""

    def _enable(layer, **kw):
        return vtw.enable(case.model, layer, **kw)

    yield _enable
    vtw.disable(case.model)


ATTN = ["eager", "sdpa"] + (["vtw"] if importlib.util.find_spec("vtw.attention") is not None else [])


def enable_vtw_attention_if_present(impl: str) -> None:
    if impl == "vtw":
        import vtw.attention  # noqa: F401  (registers the "vtw" attention implementation)


# ---------------------------------------------------------------------------------------------
# Samples and batches


@dataclass
class Sample:
    ids: list[int]  # the prompt, unpadded, with the right number of image/video tokens
    mm: dict = field(default_factory=dict)  # per-sample multimodal inputs (pixel_values, ...), or empty


@dataclass
class Case:
    """One family: how to build the model and turn samples into model inputs."""

    name: str
    model: torch.nn.Module
    visual_ids: tuple[int, ...]
    pad_id: int
    samples: list[Sample]
    batch_mm: callable  # list[Sample] -> dict of batched multimodal inputs
    extra: callable = None  # (ids [B, S] padded, attention_mask) -> extra inputs (e.g. mm_token_type_ids)
    mrope: bool = False

    @property
    def text(self):
        return self.model.model.language_model

    @property
    def suppress(self) -> list[int]:
        eos = self.model.config.text_config.eos_token_id
        return sorted(set(self.visual_ids) | ({eos} if isinstance(eos, int) else set()))


def left_pad(rows: list[list[int]], pad: int):
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    am = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = torch.tensor(r)
        am[b, S - len(r):] = 1
    return ids, am


def batch_inputs(case: Case, samples: list[Sample] | None = None) -> dict:
    samples = case.samples if samples is None else samples
    ids, am = left_pad([s.ids for s in samples], case.pad_id)
    inputs = dict(input_ids=ids, attention_mask=am, **case.batch_mm(samples))
    if case.extra is not None:
        inputs.update(case.extra(ids, am))
    return inputs


def single_inputs(case: Case, sample: Sample) -> dict:
    ids = torch.tensor([sample.ids])
    inputs = dict(input_ids=ids, **case.batch_mm([sample]))
    if case.extra is not None:
        inputs.update(case.extra(ids, torch.ones_like(ids)))
    return inputs


# ---------------------------------------------------------------------------------------------
# The reference


@dataclass
class Prepared:
    """One sample as the text decoder sees it: merged embeddings and original positions."""

    embeds: torch.Tensor  # [n, D]
    positions: torch.Tensor  # [n] or [3, n]
    visual: torch.Tensor  # [n] bool


@torch.no_grad()
def prepare(case: Case, sample: Sample) -> Prepared:
    """Runs the unmodified model once on the sample alone and captures what enters the text
    decoder (the embeddings with the vision features scattered in, and the position ids)."""
    got = {}

    def grab(module, args, kwargs):
        got.update(kwargs)

    h = case.text.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        case.model(**single_inputs(case, sample), use_cache=False)
    finally:
        h.remove()
    embeds = got["inputs_embeds"][0]
    n = embeds.shape[0]
    if case.mrope:
        pos = got["position_ids"]  # [3 or 4, 1, n] from get_rope_index; None for a text-only prompt
        pos = torch.arange(n)[None].expand(3, -1) if pos is None else pos[-3:, 0]
    else:
        pos = torch.arange(n)
    ids = torch.tensor(sample.ids)
    visual = torch.zeros(n, dtype=torch.bool)
    for v in case.visual_ids:
        visual |= ids == v
    return Prepared(embeds, pos, visual)


def _extend(case: Case, prep: Prepared, tokens: list[int]) -> Prepared:
    if not tokens:
        return prep
    tok = torch.tensor(tokens)
    emb = case.model.get_input_embeddings()(tok)
    last = int(prep.positions.max())
    new = torch.arange(1, len(tokens) + 1) + last  # text tokens continue after the largest position
    pos = torch.cat([prep.positions, new[None].expand(3, -1) if case.mrope else new], dim=-1)
    vis = torch.zeros(len(tokens), dtype=torch.bool)
    for v in case.visual_ids:
        vis |= tok == v
    return Prepared(torch.cat([prep.embeds, emb]), pos, torch.cat([prep.visual, vis]))


def _causal(m: int, dtype) -> torch.Tensor:
    return torch.full((m, m), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _call_layer(layer, h, mask, cos_sin, pos2d):
    return type(layer).forward(layer, h, attention_mask=mask, position_embeddings=cos_sin,
                               position_ids=pos2d, **cache_kwargs(None), use_cache=False)


@torch.no_grad()
def ref_last_logits(case: Case, K: int, prep: Prepared) -> torch.Tensor:
    """The paper's algorithm on one unpadded sequence, no cache: logits at the last position."""
    text = case.text
    h = prep.embeds[None]
    pos = prep.positions[:, None] if case.mrope else prep.positions[None]  # [3, 1, n] or [1, n]
    cos, sin = text.rotary_emb(h, pos)
    pos2d = prep.positions[0][None] if case.mrope else pos
    layers = list(text.layers)
    mask = _causal(h.shape[1], h.dtype)
    for layer in layers[:K]:
        h = _call_layer(layer, h, mask, (cos, sin), pos2d)
    keep = ~prep.visual
    h, cos, sin, pos2d = h[:, keep], cos[:, keep], sin[:, keep], pos2d[:, keep]
    mask = _causal(h.shape[1], h.dtype)
    for layer in layers[K:]:
        h = _call_layer(layer, h, mask, (cos, sin), pos2d)
    h = text.norm(h)
    return case.model.lm_head(h[0, -1])


def ref_greedy(case: Case, K: int, prep: Prepared, steps: int):
    """Greedy decoding by full recomputation at every step; returns (tokens, logits per step)."""
    tokens, logits = [], []
    for _ in range(steps):
        lg = ref_last_logits(case, K, _extend(case, prep, tokens))
        logits.append(lg)
        masked = lg.clone()
        masked[case.suppress] = float("-inf")
        tokens.append(int(masked.argmax()))
    return tokens, logits


def ref_forced(case: Case, K: int, prep: Prepared, tokens: list[int]):
    """Logits at every step of a given continuation (teacher forcing), by full recomputation."""
    return [ref_last_logits(case, K, _extend(case, prep, tokens[:t])) for t in range(len(tokens))]


def generated(out, inputs) -> torch.Tensor:
    return out.sequences[:, inputs["input_ids"].shape[1]:]


def gen_kwargs(case: Case, steps: int, **kw) -> dict:
    base = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                output_logits=True, suppress_tokens=case.suppress, pad_token_id=case.pad_id)
    base.update(kw)
    return base


def assert_matches_reference(case: Case, K: int, out, inputs, preps, *, greedy: bool, atol=1e-4):
    gen = generated(out, inputs)
    steps = gen.shape[1]
    for b, prep in enumerate(preps):
        toks = gen[b].tolist()
        if greedy:
            ref_toks, ref_logits = ref_greedy(case, K, prep, steps)
            assert toks == ref_toks, f"{case.name} K={K} row {b}: generated {toks}, reference {ref_toks}"
        else:
            ref_logits = ref_forced(case, K, prep, toks)
        for t in range(steps):
            torch.testing.assert_close(out.logits[t][b], ref_logits[t], atol=atol, rtol=1e-5,
                                       msg=lambda m: f"{case.name} K={K} row {b} step {t}: {m}")


def text_counts(case: Case, samples=None) -> list[int]:
    samples = case.samples if samples is None else samples
    return [sum(1 for t in s.ids if t not in case.visual_ids) for s in samples]


# ---------------------------------------------------------------------------------------------
# Families


def llava_case(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Case:
    """LLaVA-1.5: CLIP (image 8x8, patch 2: 16 patches, the CLS token dropped by the "default"
    feature strategy) -> 16 image tokens per image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=8, patch_size=2, projection_dim=32)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=256, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=63, image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    I = [63] * 16
    g = torch.Generator().manual_seed(seed + 1)

    def px(k):
        return {"pixel_values": torch.randn(k, 3, 8, 8, generator=g)} if k else {}

    samples = [
        Sample([1, 5, 6] + I + [7, 8, 9], px(1)),  # one image
        Sample([1, 3] + I + [4, 5] + I + [6], px(2)),  # two images, interleaved with text
        Sample([1, 10, 11, 12], px(0)),  # no image
        Sample([1] + I + [13, 14, 15, 16, 17, 18, 19, 20], px(1)),  # image first, longer text
    ]

    def batch_mm(ss):
        pv = [s.mm["pixel_values"] for s in ss if s.mm]
        return {"pixel_values": torch.cat(pv)} if pv else {}

    return Case("llava", model, (63,), 0, samples, batch_mm)


def _llama(layers: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2, **kw)


def _clip(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=8, patch_size=2, projection_dim=32, **kw)


def _finish(model, attn: str):
    model = model.eval()
    model.set_attn_implementation(attn)
    return model


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[n_i, ...] tensors -> [len, max n_i, ...], zero-padded (AnyRes tiles: the model slices them)."""
    n = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros(len(tensors), n, *tensors[0].shape[1:])
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def llava_next_case(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Case:
    """LLaVA-NeXT: AnyRes tiling of 8x8 tiles (grid pinpoints 8x16, 16x8, 16x16) plus the base
    image, the features unpadded to the original aspect ratio and one image-newline feature per
    row. Every one of those features sits on an image token in input_ids, so vtw withdraws the
    newline features too. The token count per image is read from the model's own
    get_image_features (the processor's arithmetic)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    cfg = LlavaNextConfig(vision_config=_clip(), text_config=_llama(layers), image_token_index=63,
                          image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]])
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)

    def image(h, w):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, 8)
        pv = torch.randn(tiles, 3, 8, 8, generator=g)
        with torch.no_grad():
            feats = model.model.get_image_features(pv, torch.tensor([[h, w]])).pooler_output
        return pv, (h, w), feats[0].shape[0]

    def sample(parts):
        ids, pvs, sizes = [], [], []
        for p in parts:
            if isinstance(p, tuple):
                pv, size, n = image(*p)
                ids += [63] * n
                pvs.append(pv)
                sizes.append(size)
            else:
                ids += p
        mm = {"pixel_values": pvs, "image_sizes": sizes} if pvs else {}
        return Sample(ids, mm)

    samples = [
        sample([[1, 5, 6], (8, 16), [7, 8, 9]]),  # wide image: 1x2 tiles, no unpadding
        sample([[1, 3], (6, 16), [4, 5], (16, 12), [6]]),  # two images, unpadded rows / columns
        sample([[1, 10, 11, 12]]),  # no image
        sample([[1], (16, 16), [13, 14, 15, 16, 17, 18, 19, 20]]),  # 2x2 tiles
    ]

    def batch_mm(ss):
        pvs = [pv for s in ss if s.mm for pv in s.mm["pixel_values"]]
        if not pvs:
            return {}
        sizes = [sz for s in ss if s.mm for sz in s.mm["image_sizes"]]
        return {"pixel_values": _stack_padded(pvs), "image_sizes": torch.tensor(sizes)}

    return Case("llava_next", model, (63,), 0, samples, batch_mm)


def video_llava_case(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Case:
    """Video-LLaVA: an image gives 16 image tokens (8x8 / patch 2, CLS dropped by the "default"
    strategy); a video of F frames gives F * 17 video tokens (every frame keeps its CLS)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    enable_vtw_attention_if_present(attn)
    cfg = VideoLlavaConfig(vision_config=_clip(), text_config=_llama(layers), image_token_index=62,
                           video_token_index=63, image_seq_length=16, video_seq_length=34)
    torch.manual_seed(seed)
    model = _finish(VideoLlavaForConditionalGeneration(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)
    I, F = [62] * 16, 2
    V = [63] * (F * 17)

    def mm(images=0, videos=0):
        out = {}
        if images:  # the keyword is pixel_values_images in transformers 5.17
            out[VIDEO_LLAVA_IMAGES_KW] = torch.randn(images, 3, 8, 8, generator=g)
        if videos:
            out["pixel_values_videos"] = torch.randn(videos, F, 3, 8, 8, generator=g)
        return out

    samples = [
        Sample([1, 5, 6] + I + [7, 8, 9], mm(images=1)),
        Sample([1, 3] + V + [4, 5, 6], mm(videos=1)),
        Sample([1, 10, 11, 12], mm()),
        Sample([1, 13] + I + [14, 15] + V + [16, 17, 18], mm(images=1, videos=1)),
    ]

    def batch_mm(ss):
        out = {}
        for key in (VIDEO_LLAVA_IMAGES_KW, "pixel_values_videos"):
            parts = [s.mm[key] for s in ss if key in s.mm]
            if parts:
                out[key] = torch.cat(parts)
        return out

    return Case("video_llava", model, (62, 63), 0, samples, batch_mm)


def llava_onevision_case(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Case:
    """LLaVA-OneVision (Qwen2 text decoder, SigLIP vision): AnyRes images with image-newline
    features; videos pooled 2x2 per frame plus one newline. Token counts read from the model's own
    get_image_features / get_video_features."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    enable_vtw_attention_if_present(attn)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=8, patch_size=2)
    tc = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=256, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=62, video_token_index=63,
                               image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]])
    torch.manual_seed(seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)

    def image(h, w):
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        tiles = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, 8)
        pv = torch.randn(tiles, 3, 8, 8, generator=g)
        with torch.no_grad():
            n = model.model.get_image_features(pv, torch.tensor([[h, w]])).pooler_output[0].shape[0]
        return pv, (h, w), n

    def video(frames):
        pv = torch.randn(1, frames, 3, 8, 8, generator=g)
        return pv, onevision_video_tokens(model, pv)

    def sample(parts):
        ids, pvs, sizes, vids = [], [], [], []
        for p in parts:
            if isinstance(p, tuple) and p[0] == "video":
                pv, n = video(p[1])
                ids += [63] * n
                vids.append(pv)
            elif isinstance(p, tuple):
                pv, size, n = image(*p)
                ids += [62] * n
                pvs.append(pv)
                sizes.append(size)
            else:
                ids += p
        mm = {}
        if pvs:
            mm.update(pixel_values=pvs, image_sizes=sizes)
        if vids:
            mm["pixel_values_videos"] = vids
        return Sample(ids, mm)

    samples = [
        sample([[1, 5, 6], (8, 16), [7, 8, 9]]),
        sample([[1, 3], ("video", 2), [4, 5, 6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1, 13], (6, 16), [14, 15], ("video", 2), [16, 17, 18]]),
    ]

    def batch_mm(ss):
        out = {}
        pvs = [pv for s in ss for pv in s.mm.get("pixel_values", [])]
        if pvs:
            out["pixel_values"] = _stack_padded(pvs)
            out["image_sizes"] = torch.tensor([sz for s in ss for sz in s.mm.get("image_sizes", [])])
        vids = [v for s in ss for v in s.mm.get("pixel_values_videos", [])]
        if vids:
            out["pixel_values_videos"] = torch.cat(vids)
        return out

    return Case("llava_onevision", model, (62, 63), 0, samples, batch_mm)


def _qwen_case(name: str, attn: str, seed: int, layers: int) -> Case:
    """Qwen2-VL / Qwen2.5-VL: patches of 2x2 pixels x 2 frames, merged 2x2, so an image of grid
    (t, h, w) gives t*h*w/4 image tokens (a video: video tokens), wrapped in vision start/end text
    tokens (60, 61). M-RoPE position ids come from the model's get_rope_index."""
    if name == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1],
                      tokens_per_second=2)
    enable_vtw_attention_if_present(attn)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = Config(vision_config=vision, text_config=text, image_token_id=62, video_token_id=63,
                 vision_start_token_id=60, vision_end_token_id=61)
    torch.manual_seed(seed)
    model = _finish(Model(cfg), attn)
    g = torch.Generator().manual_seed(seed + 1)
    patch_dim = 3 * 2 * 2 * 2

    def media(kind, t, h, w):
        pv = torch.randn(t * h * w, patch_dim, generator=g)
        return kind, pv, (t, h, w), t * h * w // 4

    def sample(parts):
        ids, mm = [], {}
        for p in parts:
            if isinstance(p, tuple):
                kind, pv, thw, n = media(*p)
                ids += [60] + [62 if kind == "image" else 63] * n + [61]
                mm.setdefault(kind, []).append((pv, thw))
            else:
                ids += p
        return Sample(ids, mm)

    samples = [
        sample([[1, 5, 6], ("image", 1, 4, 4), [7, 8, 9]]),
        sample([[1, 3], ("image", 1, 4, 6), [4, 5], ("video", 2, 4, 4), [6]]),
        sample([[1, 10, 11, 12]]),
        sample([[1], ("image", 1, 6, 4), [13, 14, 15, 16, 17, 18, 19, 20]]),
    ]

    def batch_mm(ss):
        out = {}
        for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            items = [it for s in ss for it in s.mm.get(kind, [])]
            if items:
                out[pv_key] = torch.cat([pv for pv, _ in items])
                out[grid_key] = torch.tensor([thw for _, thw in items])
        return out

    def extra(ids, am):
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[ids == 62] = 1
        types[ids == 63] = 2
        return {"mm_token_type_ids": types}

    return Case(name, model, (62, 63), 0, samples, batch_mm, extra=extra, mrope=True)


def qwen2_vl_case(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Case:
    return _qwen_case("qwen2_vl", attn, seed, layers)


def qwen2_5_vl_case(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Case:
    return _qwen_case("qwen2_5_vl", attn, seed, layers)


CASES = {
    "llava": llava_case,
    "llava_next": llava_next_case,
    "llava_onevision": llava_onevision_case,
    "video_llava": video_llava_case,
    "qwen2_vl": qwen2_vl_case,
    "qwen2_5_vl": qwen2_5_vl_case,
}


@torch.no_grad()
def ref_compact(case: Case, K: int, sample: Sample, steps: int, follow: list[int] | None = None, turn2: int = 0):
    """Compact mode on one unpadded sample, with the UNMODIFIED model (vtw must be disabled): a
    full prefill into a DynamicCache, then the caches of layers >= K cut to the text positions by
    boolean indexing, then greedy decoding one token at a time with SDPA (one query attends to
    its whole cache, so layers with shorter caches need no mask). `follow` tokens (a follow-up
    turn) are fed one by one after the first `steps` tokens, then `turn2` more are generated.
    Returns (tokens, logits per generated step)."""
    from transformers import DynamicCache

    model = case.model
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None  # Qwen2-VL keeps M-RoPE offsets between calls; start afresh
    try:
        cache = DynamicCache(config=model.config)
        out = model(**single_inputs(case, sample), **cache_kwargs(cache), use_cache=True)
        keep = torch.ones(len(sample.ids), dtype=torch.bool)
        for v in case.visual_ids:
            keep &= torch.tensor(sample.ids) != v
        for lay in cache.layers[K:]:
            lay.keys, lay.values = lay.keys[:, :, keep], lay.values[:, :, keep]
        tokens, logits = [], []
        lg = out.logits[0, -1]

        def emit(lg):
            logits.append(lg)
            masked = lg.clone()
            masked[case.suppress] = float("-inf")
            tokens.append(int(masked.argmax()))
            return tokens[-1]

        # Positions given explicitly (with K = 0 the cut layer-0 cache no longer counts the tokens seen):
        # text tokens continue after the prompt, shifted by Qwen2-VL's M-RoPE offset.
        delta = getattr(model.model, "rope_deltas", None)
        seen = [len(sample.ids) + (int(delta) if delta is not None else 0)]

        def step(tok):
            pos = torch.tensor([[seen[0]]])
            seen[0] += 1
            pos = pos[None].expand(3, 1, 1) if case.mrope else pos
            return model(input_ids=torch.tensor([[tok]]), position_ids=pos, **cache_kwargs(cache), use_cache=True).logits[0, -1]

        for t in range(steps):
            tok = emit(lg)
            if t + 1 < steps or follow:
                lg = step(tok)
        if follow:
            for tok in follow:
                lg = step(tok)
            for t in range(turn2):
                tok = emit(lg)
                if t + 1 < turn2:
                    lg = step(tok)
        return tokens, logits
    finally:
        model.set_attn_implementation(impl)
