"""The embedded model's architecture, tokenizer and processor (no weights: see vtw.embedded.train).

A LLaVA-1.5 model in miniature, built from transformers' own classes so that everything that
works on LLaVA works on it unchanged (``vtw.enable``, ``vtw.calibrate``, ``AutoProcessor`` and
``AutoModelForImageTextToText`` loading, ``generate``):

- vision tower: CLIP, 48 x 48 pictures in 6 x 6 patches (64 patches + CLS), one transformer layer,
  hidden 64; LLaVA's "default" feature strategy drops CLS, so a picture is 64 image tokens;
- projector: LLaVA's two-layer GELU MLP;
- language model: Llama, 6 decoder layers, hidden 64, 4 heads, MLP width 128, rotary positions;
  trained with heads of 16 dimensions and shipped with heads of 32 (:func:`widen_heads`: an exact
  re-layout, zero-padded, so that vLLM's CPU attention, which has no 16-wide kernel, serves it);
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


#: the head size of the trained language model, and of the shipped one (see :func:`widen_heads`)
TRAINED_HEAD_DIM = TEXT["hidden_size"] // TEXT["num_attention_heads"]  # 16
SHIPPED_HEAD_DIM = 32


def config(head_dim: int = TRAINED_HEAD_DIM):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    text = LlamaConfig(vocab_size=len(vocab), pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       head_dim=head_dim, **TEXT)
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


def _widened_index(old: int, new: int):
    """Where each of a head's `old` dimensions goes in a head of `new` dimensions, so that Llama's
    rotary embedding (dimension i paired with i + d/2, at frequency theta^(-2i/d)) gives every
    old pair the same partner and the same frequency: old i -> new (new/old) i, old i + old/2 ->
    new (new/old) i + new/2. The other new dimensions stay zero."""
    import torch

    if new % old or (new // old) < 1:
        raise ValueError(f"vtw.embedded.build.widen_heads: head_dim must be a multiple of {old}, got {new}")
    r, half = new // old, old // 2
    i = torch.arange(half)
    return torch.cat([r * i, r * i + new // 2])


def widen_heads(model, head_dim: int = SHIPPED_HEAD_DIM):
    """The same language model with heads of `head_dim` dimensions instead of the trained 16, in a
    new LlavaForConditionalGeneration: every head's query, key and value dimensions are placed by
    :func:`_widened_index` (rotary pairs and frequencies unchanged), the new dimensions are zero in
    the query, key and value projections and in the output projection's columns, so they add
    nothing to any score or output, and the query projection is multiplied by
    sqrt(head_dim / 16) so that the attention's softmax scale 1/sqrt(head_dim) gives the trained
    1/sqrt(16). The outputs equal the trained model's up to float rounding (that one factor and
    the summation order)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    tc = model.config.text_config
    old = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    cfg = config(head_dim=head_dim)
    cfg.text_config.max_position_embeddings = tc.max_position_embeddings
    wide = LlavaForConditionalGeneration(cfg).eval()
    src = model.state_dict()
    idx = _widened_index(old, head_dim)
    scale = (head_dim / old) ** 0.5
    out = {}
    with torch.no_grad():
        for name, t in src.items():
            proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
            if ".language_model." in name and proj in ("q_proj", "k_proj", "v_proj"):
                heads = t.shape[0] // old
                w = t.new_zeros(heads, head_dim, t.shape[1])
                w[:, idx] = t.view(heads, old, t.shape[1])
                w = w.reshape(heads * head_dim, t.shape[1])
                out[name] = w * scale if proj == "q_proj" else w
            elif ".language_model." in name and proj == "o_proj":
                heads = t.shape[1] // old
                w = t.new_zeros(t.shape[0], heads, head_dim)
                w[:, :, idx] = t.view(t.shape[0], heads, old)
                out[name] = w.reshape(t.shape[0], heads * head_dim)
            else:
                out[name] = t
    wide.load_state_dict(out, strict=True)
    return wide


#: transformers 5.x's own parameter names -> the llava-hf checkpoint names (vLLM's loader reads
#: only these; transformers loads both)
LLAVA_HF_NAMES = (("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                  ("model.vision_tower.", "vision_tower.vision_model."),
                  ("model.multi_modal_projector.", "multi_modal_projector."),
                  ("model.image_newline", "image_newline"),
                  ("model.language_model.", "language_model.model."),
                  ("lm_head.", "language_model.lm_head."))


def save_llava_hf(model, folder) -> None:
    """Saves a LLaVA / LLaVA-NeXT (config, generation config, weights) to `folder` under the
    llava-hf weight names (:data:`LLAVA_HF_NAMES`), one ``model.safetensors``."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    model.save_pretrained(folder)
    sd = {}
    for k, v in model.state_dict().items():
        old, new = next(((o, n) for o, n in LLAVA_HF_NAMES if k.startswith(o)), ("", ""))
        sd[new + k[len(old):]] = v.contiguous()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


#: The chat template (tokenizer and processor): LLaVA-1.5's conversation format, exactly as the
#: task's prompts and the training conversations write it (:func:`vtw.embedded.task.prompt`,
#: :func:`vtw.embedded.task.conversation_text`): ``<s>`` and the system prompt (a system message
#: replaces it), then per user turn ``" USER: "``, ``"<image>\n"`` per picture, the text and
#: ``" ASSISTANT:"``, per assistant turn ``" {answer} </s>"``. A user turn's content may be a
#: string or a list of parts (``image`` / ``image_url`` and ``text``); the generation prompt is
#: always there (every user turn ends in ``ASSISTANT:``). A short-answer question is sent as
#: ``"{question} answer the question using a single word or phrase ."``, as LLaVA-1.5's
#: evaluation sends it.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{{- messages[0]['content'] -}}"
    "{%- else -%}{%- for p in messages[0]['content'] -%}{%- if p['type'] == 'text' -%}{{- p['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{{- \"" + task.SYSTEM + "\" -}}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- ' USER: ' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}"
    "{%- for p in m['content'] -%}{%- if p['type'] in ('image', 'image_url') -%}{{- '<image>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for p in m['content'] -%}{%- if p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{{- ' ASSISTANT:' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if m['content'] is string -%}{{- ' ' + m['content'] + ' </s>' -}}"
    "{%- else -%}{%- for p in m['content'] -%}{%- if p['type'] == 'text' -%}{{- ' ' + p['text'] + ' </s>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}")


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
    fast.chat_template = CHAT_TEMPLATE
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
                          image_token="<image>", chat_template=CHAT_TEMPLATE)
