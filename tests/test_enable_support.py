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

import torch

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
        pos = got["position_ids"]
        pos = pos[-3:, 0] if pos.ndim == 3 else pos[None, 0].expand(3, -1)
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
                               position_ids=pos2d, cache=None, use_cache=False)


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
