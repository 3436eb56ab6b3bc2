"""Tiny LLaVA-1.5 models built locally (random weights, no download) in the folder layout vLLM
loads: for the tests and the benchmark.

The tokenizer and processor are the embedded model's (:mod:`vtw.embedded.build`: a word-level
tokenizer, CLIP's PIL image processor, 48 x 48 pictures in 6 x 6 patches: 64 image tokens); the
language model's head size is 32 (vLLM's CPU attention supports 32, 64, 80, ...). Weights are
saved in the llava-hf layout vLLM's loader expects (``vision_tower.vision_model.*``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def llava_config(layers: int = 4, hidden: int = 64, heads: int = 2, intermediate: int = 128,
                 init: float = 0.3, image_size: int | None = None, patch: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vtw.embedded import build, task

    vocab = build.vocabulary()
    image_size = image_size or task.IMAGE_SIZE
    patch = patch or task.CELL
    text = LlamaConfig(vocab_size=len(vocab), pad_token_id=build.PAD_ID, bos_token_id=build.BOS_ID,
                       eos_token_id=build.EOS_ID, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       initializer_range=init, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=build.IMAGE_ID,
                      image_seq_length=(image_size // patch) ** 2, vision_feature_select_strategy="default",
                      vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)
    cfg.pad_token_id = build.PAD_ID
    return cfg



def _save_llava_hf_layout(model, folder: Path) -> None:
    """Saves a LLaVA / LLaVA-NeXT under the llava-hf weight names vLLM's loader wants (the
    embedded model's saver: :func:`vtw.embedded.build.save_llava_hf`)."""
    from vtw.embedded import build

    build.save_llava_hf(model, folder)


def _never_stop_on_eos(folder: Path) -> None:
    """The tests' greedy references run a fixed number of tokens: no EOS in the generation config."""
    gen = folder / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text())
        g.pop("eos_token_id", None)
        gen.write_text(json.dumps(g))

def build_llava(folder, seed: int = 0, **kw) -> Path:
    """Writes a random tiny LLaVA-1.5 (float32) to `folder`; returns the folder."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vtw.embedded import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = llava_config(**kw)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a visible image signal: the default init leaves the projector tiny
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(3.0)
    _save_llava_hf_layout(model, folder)
    proc = build.processor()
    size = kw.get("image_size")
    if size:  # another picture size (e.g. 144 px in 6 px patches: LLaVA-1.5's 576 image tokens)
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                                   do_center_crop=False, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc = LlavaProcessor(image_processor=ip, tokenizer=build.tokenizer(), patch_size=kw.get("patch") or 6,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def build_llama(folder, seed: int = 0, layers: int = 2) -> Path:
    """A random tiny text-only Llama (a family vtw.vllm does not withdraw in)."""
    import torch
    from transformers import LlamaForCausalLM

    from vtw.embedded import build

    folder = Path(folder)
    cfg = llava_config(layers=layers).text_config
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    build.tokenizer().save_pretrained(folder)
    return folder


# A workload for the tests and the TP check: image and text-only requests of several lengths.
PROMPTS = [  # (text, image seed or None)
    ("<image> " + " ".join(["describe the shapes and colors"] * 3), 4),
    ("<image> what shape is in the picture", 0),
    ("what color is the square", None),
    ("<image> is there a circle", 1),
    ("how many shapes", None),
    ("<image> where is the red shape in the grid of the picture now", 2),
    ("<image> yes", 3),
]


def image(seed: int, h: int = 48, w: int | None = None):
    """A random RGB picture, h x w pixels (square where w is None), from `seed`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, h if w is None else w, 3), dtype=np.uint8))


@contextlib.contextmanager
def preemptions(llm):
    """Within the block, the ids of the requests the engine's scheduler preempts, in order."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    preempted = []
    orig = sched._preempt_request
    sched._preempt_request = lambda req, *a, **k: (preempted.append(req.request_id), orig(req, *a, **k))[1]
    try:
        yield preempted
    finally:
        sched._preempt_request = orig


def run_workload(llm, new_tokens: int, prompts=PROMPTS, image=image,
                 aborted=("<image> this one is aborted", 9)):
    """Runs `prompts` through the engine's step loop: requests arrive over several steps
    (continuous batching) and one extra request is aborted mid-flight; counts preemptions.
    Returns ([(prompt ids, generated ids)] in the order of `prompts`, number of preemptions)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    pending = [(f"r{i}", {"prompt": t, **({"multi_modal_data": {"image": image(s)}} if s is not None else {})})
               for i, (t, s) in enumerate(prompts)]
    pending.insert(2, ("abort-me", {"prompt": aborted[0], "multi_modal_data": {"image": image(aborted[1])}}))
    done, steps = {}, 0
    with preemptions(llm) as preempted:
        while pending or engine.has_unfinished_requests():
            if pending and (steps == 0 or steps % 2 == 1):  # two at first, then one every other step
                for _ in range(2 if steps == 0 else 1):
                    if pending:
                        rid, prompt = pending.pop(0)
                        engine.add_request(rid, prompt, sp)
            if steps == 6:
                engine.abort_request(["abort-me"])
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = (list(o.prompt_token_ids), list(o.outputs[0].token_ids))
            steps += 1
            if steps > 5000:
                raise RuntimeError("vtw.vllm.tiny.run_workload: the engine did not finish")
    return [done[f"r{i}"] for i in range(len(prompts))], len(preempted)


def step_paths(llm):
    """(whether the engine compiles the language model, steps that ran its compiled graph, steps
    that ran eagerly) of vtw in the in-process engine (see vtw.vllm._runner)."""
    from . import _runner

    st = _runner.state_of(llm.llm_engine.model_executor.driver_worker.worker.model_runner)
    return st.compiles, st.compiled_steps, st.eager_steps


def free_blocks(llm):
    """(free KV blocks, usable KV blocks) of the engine's scheduler (in-process engine core)."""
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    return pool.get_num_free_blocks(), pool.num_gpu_blocks - 1


# Tiny Qwen2-VL: the embedded vocabulary plus Qwen's vision tokens, M-RoPE (sections 4, 6, 6 of a
# 32-wide head), a one-block vision tower; pictures of 56..112 pixels: 4..16 image tokens.
QWEN_VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def build_qwen2_vl(folder, seed: int = 0, layers: int = 4, family: str = "qwen2_vl") -> Path:
    """Writes a random tiny Qwen2-VL (``family="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``,
    windowed vision attention) in float32, with its tokenizer and processor, to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from vtw.embedded import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = dict(build.vocabulary())
    for t in QWEN_VISION:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": QWEN_VISION})
    if family == "qwen2_vl":
        config_cls, model_cls, proc_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
    elif family == "qwen2_5_vl":
        config_cls, model_cls, proc_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
    else:
        raise ValueError(f"family must be qwen2_vl or qwen2_5_vl, got {family!r}")
    cfg = config_cls(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.3, bos_token_id=build.BOS_ID, eos_token_id=build.EOS_ID,
                         pad_token_id=build.PAD_ID, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
        vision_config=vision,
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.save_pretrained(folder)
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    proc = proc_cls(image_processor=ip, tokenizer=fast, video_processor=Qwen2VLVideoProcessor(),
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


QWEN_PROMPTS = [
    ("describe the shapes and colors " + QWEN_IMAGE + " " + " ".join(["where is the red shape"] * 3), 0),
    (QWEN_IMAGE + " what shape is in the picture", 1),
    ("what color is the square", None),
    ("is there " + QWEN_IMAGE + " a circle", 2),
    ("how many shapes", None),
    (QWEN_IMAGE + " yes", 3),
]


def qwen_image(seed: int):
    """Pictures of different sizes (different M-RoPE grids)."""
    h, w = [(112, 112), (56, 112), (112, 84), (84, 56), (56, 56)][seed % 5]
    return image(seed, h, w)


def build_llava_next(folder, seed: int = 0, layers: int = 4) -> Path:
    """A random tiny LLaVA-NeXT (AnyRes: 48 x 48 tiles of 64 tokens, base picture plus tiles, one
    newline token per row of patches; all of them carry the image token id)."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vtw.embedded import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = llava_config(layers=layers)
    cfg = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                          image_token_index=build.IMAGE_ID, vision_feature_select_strategy="default",
                          vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False,
                          image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]], image_seq_length=64)
    cfg.pad_token_id = build.PAD_ID
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(3.0)
        model.model.image_newline.normal_(0, 1.0)
    _save_llava_hf_layout(model, folder)
    n = 48
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": n}, crop_size={"height": n, "width": n},
                                    image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]], do_center_crop=True,
                                    resample=3, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=build.tokenizer(), patch_size=6,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def next_image(seed: int):
    """Pictures of AnyRes shapes: tall, wide, square."""
    h, w = [(96, 48), (48, 96), (96, 96), (60, 50)][seed % 4]
    return image(seed, h, w)


# Tiny Qwen3-VL / Qwen3-VL-MoE: Qwen's vision tokens on the embedded vocabulary, interleaved M-RoPE
# (sections 4, 6, 6 of a 32-wide head), a two-block vision tower in 16-pixel patches merged 2 x 2
# whose blocks 0 and 1 feed DeepStack (added after decoder layers 0 and 1); pictures of 64..128
# pixels: 4..16 image tokens.
QWEN3_DEEPSTACK = 2  # decoder layers followed by a DeepStack injection (len(deepstack_visual_indexes))


def build_qwen3_vl(folder, seed: int = 0, layers: int = 4, moe: bool = False, deepstack: int = QWEN3_DEEPSTACK,
                   max_edge: int = 128) -> Path:
    """Writes a random tiny Qwen3-VL (``moe=True``: Qwen3-VL-MoE, 4 experts of which 2 per token,
    in every layer) in float32, with its tokenizer and processor, to `folder`. `deepstack`: decoder
    layers followed by a DeepStack injection (Qwen3-VL-2B: 3); `max_edge`: the processor's largest
    square picture in pixels (512: 256 image tokens)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from vtw.embedded import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = dict(build.vocabulary())
    for t in QWEN_VISION:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": QWEN_VISION})
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                initializer_range=0.3, bos_token_id=build.BOS_ID, eos_token_id=build.EOS_ID,
                pad_token_id=build.PAD_ID, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    if moe:
        config_cls, model_cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
        # expert width 96: neither expert tensor is square, so transformers' load-time check can
        # tell the released layout from its own (see _qwen3_vl_moe_released_layout)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, decoder_sparse_step=1,
                    norm_topk_prob=True)
    else:
        config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vision = dict(depth=deepstack, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(deepstack)))
    cfg = config_cls(text_config=text, vision_config=vision,
                     image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                     vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
                     tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # DeepStack features on the scale of the hidden states (~100 after layer 0 here)
        for m in model.model.visual.deepstack_merger_list:
            m.linear_fc2.weight.mul_(100.0)
            m.linear_fc2.bias.mul_(100.0)
    model.save_pretrained(folder)
    if moe:
        _qwen3_vl_moe_released_layout(folder)
    size = {"shortest_edge": 64 * 64, "longest_edge": max_edge * max_edge}
    ip = Qwen2VLImageProcessorPil(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    vp = Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=fast, video_processor=vp,
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def _qwen3_vl_moe_released_layout(folder: Path) -> None:
    """The expert tensors in the layout of the released Qwen3-VL-MoE checkpoints, which vLLM's
    loader expects (gate_up_proj [E, hidden, 2 x width], down_proj [E, width, hidden]);
    transformers 5.19 saves its own (transposed) and transposes back on load when the shapes
    differ from its parameters."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    for k, v in tensors.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            tensors[k] = v.transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def qwen3_image(seed: int):
    """Pictures of different sizes in multiples of 32 pixels (16-pixel patches merged 2 x 2):
    different M-RoPE grids, 4..16 image tokens."""
    h, w = [(128, 128), (64, 128), (128, 96), (96, 64), (64, 64)][seed % 5]
    return image(seed, h, w)


# Tiny Gemma 3: the embedded vocabulary plus Gemma's image tokens (and the newline tokens vLLM's
# Gemma 3 processor looks up), 6 decoder layers in Gemma 3's pattern (5 sliding-window layers,
# then a full-attention one; their rotary bases differ), a one-block SigLIP tower: 32 x 32
# pictures in 4 x 4 patches, pooled 2 x 2 into 16 image tokens between <start_of_image> and
# <end_of_image> (text tokens).
GEMMA_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
GEMMA_IMAGE = "<start_of_image>"


def build_gemma3(folder, seed: int = 0, layers: int = 6, sliding_window: int = 128, image_tokens: int = 16) -> Path:
    """Writes a random tiny Gemma 3 (``Gemma3ForConditionalGeneration``) in float32, with its
    tokenizer and processor, to `folder`. Layer i slides (window `sliding_window`, rotary base
    10 000) unless i % 6 == 5 (full attention, rotary base 1 000 000), as in Gemma 3.
    `image_tokens` per picture (a square: 16 from 32 x 32 pixels, 256 as Gemma 3 from 64 x 64)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from vtw.embedded import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = dict(build.vocabulary())
    for t in GEMMA_IMAGE_TOKENS + GEMMA_NEWLINES:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", build.BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>",
                                   extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                         "image_token": "<image_soft_token>"})
    fast.add_special_tokens({"additional_special_tokens": GEMMA_IMAGE_TOKENS})
    types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)]
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                max_position_embeddings=4096, initializer_range=0.3, bos_token_id=build.BOS_ID,
                eos_token_id=build.EOS_ID, pad_token_id=build.PAD_ID, sliding_window=sliding_window,
                layer_types=types, tie_word_embeddings=False,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    side = {16: 32, 256: 64}[image_tokens]  # 4-pixel patches pooled to sqrt(image_tokens) a side
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=side,
                  patch_size=4, vision_use_head=False)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=image_tokens,
                       boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                       image_token_index=vocab["<image_soft_token>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises the projection to zero: pictures would not matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    _save_llava_hf_layout(model, folder)  # vision_tower.vision_model.* (vLLM's SigLIP names), as llava-hf
    ip = Gemma3ImageProcessorPil(size={"height": side, "width": side}, resample=3, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=fast, image_seq_length=image_tokens,
                           chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


GEMMA_PROMPTS = [  # (text, image seed or None); 16 image tokens + <start/end_of_image> per picture
    ("describe the shapes and colors " + GEMMA_IMAGE + " " + " ".join(["where is the red shape"] * 3), 0),
    (GEMMA_IMAGE + " what shape is in the picture", 1),
    ("what color is the square", None),
    ("is there " + GEMMA_IMAGE + " a circle", 2),
    ("how many shapes", None),
    (GEMMA_IMAGE + " yes", 3),
]


def gemma_image(seed: int):
    h, w = [(32, 32), (40, 24), (24, 48), (32, 32)][seed % 4]
    return image(seed, h, w)


def _word_tokenizer(extra, special):
    """The embedded word-level tokenizer (``<s>`` prepended) with `extra` words appended to its
    vocabulary, `special` of them added as special tokens (matched before the split into words;
    a newline among them stays a token of its own)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vtw.embedded import build

    vocab = dict(build.vocabulary())
    for t in extra:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", build.BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                           for t in special]})
    return fast, vocab


def _text_config(vocab_size: int, layers: int) -> dict:
    """The language model of every tiny family here: hidden 64, 2 heads of 32, MLP 128."""
    from vtw.embedded import build

    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=build.BOS_ID, eos_token_id=build.EOS_ID,
                pad_token_id=build.PAD_ID, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# Tiny Mistral 3 (Mistral Small 3.1's layout: a Pixtral vision tower, a patch merger, a Mistral
# language model): 8-pixel merged patches (4-pixel patches merged 2 x 2), pictures of at most 48
# pixels: up to 6 x 6 image tokens, each row followed by [IMG_BREAK] ([IMG_END] after the last),
# which are text tokens.
MISTRAL3_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL3_IMAGE = "[IMG]"


def build_mistral3(folder, seed: int = 0, layers: int = 4) -> Path:
    """Writes a random tiny Mistral3ForConditionalGeneration (float32) with its Pixtral processor
    to `folder`."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a few words between the embedded vocabulary and the image tokens: the image token id is
    # nothing like the embedded model's (vtw must read it from the config)
    fast, vocab = _word_tokenizer(["red_", "green_", "blue_"] + MISTRAL3_TOKENS, MISTRAL3_TOKENS)
    text = dict(_text_config(len(vocab), layers), model_type="mistral", sliding_window=None)
    vision = dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=32, patch_size=4, image_size=48, num_channels=3,
                  hidden_act="silu", rope_theta=10000.0)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab["[IMG]"],
                         spatial_merge_size=2, projector_hidden_act="gelu", vision_feature_layer=-1,
                         multimodal_projector_bias=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a visible image signal
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(3.0)
    model.save_pretrained(folder)
    ip = PixtralImageProcessorPil(size={"longest_edge": 48}, patch_size={"height": 4, "width": 4},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = PixtralProcessor(image_processor=ip, tokenizer=fast, patch_size=4, spatial_merge_size=2,
                            image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def mistral3_image(seed: int):
    """Pictures of several shapes (multiples of the 8-pixel merged patch, at most 48 pixels)."""
    h, w = [(48, 48), (24, 48), (48, 32), (32, 16), (16, 16)][seed % 5]
    return image(seed, h, w)


# Tiny Idefics3 / SmolVLM: a SigLIP-style vision tower on 32 x 32 tiles of 4-pixel patches, pixel
# shuffle by 2: 16 image tokens per tile; pictures resized to a 64-pixel longest edge and split
# into up to 2 x 2 tiles plus the global picture (48 or 80 image tokens). <fake_token_around_image>,
# <row_i_col_j>, <global-img> and the newlines around them are text tokens.
IDEFICS3_TOKENS = (["<fake_token_around_image>", "<end_of_utterance>", "<global-img>", "\n"]
                   + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
IDEFICS3_IMAGE = "<image>"


def build_idefics3(folder, seed: int = 0, layers: int = 4, family: str = "idefics3") -> Path:
    """Writes a random tiny Idefics3 (``family="idefics3"``) or SmolVLM (``"smolvlm"``) in float32,
    with its processor, to `folder`."""
    import torch

    from vtw.embedded import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = IDEFICS3_TOKENS + ["<image>"]
    if family == "smolvlm":
        special = special + ["<video>"]
    fast, vocab = _word_tokenizer(["yellow_"] + special, special)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=4, num_channels=3)
    kw = dict(text_config=dict(_text_config(len(vocab), layers), model_type="llama"),
              scale_factor=2, image_token_id=vocab["<image>"], pad_token_id=build.PAD_ID, tie_word_embeddings=False)
    ip_kw = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True,
                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        cfg = Idefics3Config(vision_config=dict(vision, model_type="idefics3_vision"), **kw)
        model_cls = Idefics3ForConditionalGeneration
        proc_fn = lambda: Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**ip_kw), tokenizer=fast,  # noqa: E731
                                            image_seq_len=16)
    elif family == "smolvlm":
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        cfg = SmolVLMConfig(vision_config=dict(vision, model_type="smolvlm_vision"), **kw)
        model_cls = SmolVLMForConditionalGeneration
        proc_fn = lambda: SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**ip_kw), tokenizer=fast,  # noqa: E731
                                           video_processor=SmolVLMVideoProcessor(), image_seq_len=16)
    else:
        raise ValueError(f"family must be idefics3 or smolvlm, got {family!r}")
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # a visible image signal
        for p in model.model.connector.parameters():
            p.mul_(3.0)
    model.save_pretrained(folder)
    proc_fn().save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def idefics3_image(seed: int):
    """Pictures of several shapes: 2 x 2, 1 x 2 and 2 x 1 tiles (plus the global picture)."""
    h, w = [(64, 64), (32, 64), (64, 32), (40, 60)][seed % 4]
    return image(seed, h, w)


def _named_tokenizer(extra: list[str], **named):
    """The embedded vocabulary plus `extra` special tokens (word-level, no BOS added): a fast
    tokenizer; `named` become its model-specific special tokens (e.g. ``image_token="<image>"``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtw.embedded import build

    vocab = dict(build.vocabulary())
    for t in extra:
        if t not in vocab:
            vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=named or None)
    fast.add_special_tokens({"additional_special_tokens": [t for t in extra if t != "<image>"]})
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast, vocab


def _qwen2_text(vocab_size: int, layers: int) -> dict:
    """A tiny Qwen2 language model (LLaVA-OneVision's and InternVL3's): head size 32, QKV bias."""
    from vtw.embedded import build

    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab_size, hidden_size=64,
                intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=4096, initializer_range=0.3, rms_norm_eps=1e-6, use_sliding_window=False,
                bos_token_id=build.BOS_ID, eos_token_id=build.EOS_ID, pad_token_id=build.PAD_ID,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# Tiny LLaVA-OneVision: SigLIP tiles of 24 x 24 pixels in 6 x 6 patches (16 tokens), AnyRes over
# 24-pixel grids up to 48 x 48 (base picture, the unpadded tiles, one newline per row: all carry
# the image token id).
OV_PINPOINTS = [[24, 48], [48, 24], [48, 48]]


def build_llava_onevision(folder, seed: int = 0, layers: int = 4) -> Path:
    """Writes a random tiny LLaVA-OneVision (Qwen2 language model, SigLIP vision tower, float32)
    with its tokenizer and processor to `folder`; returns the folder."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast, vocab = _named_tokenizer(["<image>", "<video>"], image_token="<image>", video_token="<video>")
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=24, patch_size=6, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=_qwen2_text(len(vocab), layers), vision_config=vision,
                               image_token_index=vocab["<image>"], video_token_index=vocab["<video>"],
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=OV_PINPOINTS,
                               projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a visible image signal
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(3.0)
        model.model.image_newline.normal_(0, 1.0)
    _save_llava_hf_layout(model, folder)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 24, "width": 24}, image_grid_pinpoints=OV_PINPOINTS,
                                         resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=fast, video_processor=LlavaOnevisionVideoProcessor(),
                                   num_image_tokens=16, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9", image_token="<image>", video_token="<video>",
                                   chat_template=fast.chat_template)
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def ov_image(seed: int):
    """Pictures of AnyRes shapes (tall, wide, 2 x 2 tiles unpadded to fewer rows, one tile):
    36..70 image tokens. (vLLM sizes its encoder cache from a hard-coded 1153 x 944 picture,
    70 tokens with this tiny config; a square or tall 2 x 2 picture, 72..88, would not fit.)"""
    h, w = [(48, 24), (24, 48), (30, 40), (25, 30), (20, 20)][seed % 5]
    return image(seed, h, w)


# Tiny InternVL (the HF format, InternVL3-*-hf): InternViT tiles of 32 x 32 pixels in 4 x 4
# patches, pixel shuffle 0.5: 4 x 4 = 16 tokens per tile; up to 4 tiles plus a thumbnail.
# <img> and </img> around them are text; only <IMG_CONTEXT> (the config's image_token_id) is visual.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_IMAGE = "<IMG_CONTEXT>"


def build_internvl(folder, seed: int = 0, layers: int = 4) -> Path:
    """Writes a random tiny InternVL (HF format: Qwen2 language model, InternViT, float32) with its
    tokenizer and processor to `folder`; returns the folder."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast, vocab = _named_tokenizer(INTERNVL_TOKENS, start_image_token="<img>", end_image_token="</img>",
                                  context_image_token="<IMG_CONTEXT>", video_token="<video>")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[32, 32], patch_size=[4, 4], initializer_range=0.3)
    cfg = InternVLConfig(text_config=_qwen2_text(len(vocab), layers), vision_config=vision,
                         image_token_id=vocab["<IMG_CONTEXT>"], image_seq_length=16, downsample_ratio=0.5,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a visible image signal
        for p in model.model.multi_modal_projector.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    model.save_pretrained(folder)
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                  max_patches=4, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = InternVLProcessor(image_processor=ip, tokenizer=fast, video_processor=InternVLVideoProcessor(),
                             image_seq_length=16, chat_template=fast.chat_template)
    proc.save_pretrained(folder)
    _never_stop_on_eos(folder)
    return folder


def internvl_image(seed: int):
    """Pictures that crop to 1, 2 or 4 tiles (with a thumbnail beyond one)."""
    h, w = [(32, 64), (64, 32), (64, 64), (30, 30), (32, 96)][seed % 5]
    return image(seed, h, w)
