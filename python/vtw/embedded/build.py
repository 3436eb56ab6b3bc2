"""The embedded model's architecture, tokenizer and processor (no weights: see vtw.embedded.train).

A LLaVA-1.5 model in miniature, built from transformers' own classes so that everything that
works on LLaVA works on it unchanged (``vtw.enable``, ``vtw.calibrate``, ``AutoProcessor`` and
``AutoModelForImageTextToText`` loading, ``generate``):

- vision tower: CLIP, 48 x 48 pictures in 6 x 6 patches (64 patches + CLS), one transformer layer,
  hidden 64; LLaVA's "default" feature strategy drops CLS, so a picture is 64 image tokens;
- projector: LLaVA's two-layer GELU MLP;
- language model: Llama, 6 decoder layers, hidden 64, 4 heads, MLP width 128, rotary positions;
- tokenizer: a word-level ``tokenizers`` model (the task's ~50 words), wrapped in
  ``PreTrainedTokenizerFast``; ``<s>`` is prepended, ``<image>`` is a special token;
- image processor: CLIP's PIL backend (no torchvision needed), resize to 48 x 48, scale to [-1, 1].
"""

from __future__ import annotations

from . import task

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
IMAGE_TOKENS = (task.IMAGE_SIZE // task.CELL) ** 2  # 64

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
            initializer_range=0.1, tie_word_embeddings=False)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              image_size=task.IMAGE_SIZE, patch_size=task.CELL, projection_dim=64)


def vocabulary() -> dict[str, int]:
    words = SPECIAL + [w for w in task.WORDS if w not in SPECIAL]
    return {w: i for i, w in enumerate(words)}


def config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    text = LlamaConfig(vocab_size=len(vocab), pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       **TEXT)
    vision = CLIPVisionConfig(**VISION)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                      image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="default",
                      vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)
    cfg.pad_token_id = PAD_ID
    return cfg


def model(seed: int = 0):
    """A randomly initialised embedded model (float32, eval mode), seeded."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(config())
    return m.eval()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})
    return fast


def image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    n = task.IMAGE_SIZE
    return CLIPImageProcessorPil(size={"height": n, "width": n}, crop_size={"height": n, "width": n},
                                 do_center_crop=False, resample=3, image_mean=[0.5, 0.5, 0.5],
                                 image_std=[0.5, 0.5, 0.5])


def processor():
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer(), patch_size=task.CELL,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")
