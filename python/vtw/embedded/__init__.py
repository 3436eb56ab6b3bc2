"""The embedded default model: a tiny LLaVA-1.5 that vtw trains itself (no download).

- :mod:`vtw.embedded.task`: the synthetic visual question-answering task (shapes on a grid);
- :mod:`vtw.embedded.build`: the architecture (transformers' ``LlavaForConditionalGeneration``
  with a CLIP vision tower and a Llama language model), tokenizer and processor;
- :mod:`vtw.embedded.train`: the deterministic training script, ``python -m vtw.embedded.train``;
- ``model/``: the trained model as a Hugging Face folder (config, safetensors weights, tokenizer,
  processor, ``training.json``), so ``AutoModelForImageTextToText.from_pretrained`` and
  ``AutoProcessor.from_pretrained`` load it, and ``python -m vtw calibrate --model`` takes it.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def path() -> Path:
    """The folder of the shipped model; raises FileNotFoundError (saying how to build it) if the
    weights are missing."""
    if not (MODEL_DIR / "model.safetensors").is_file() or not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"vtw.embedded: the embedded model is missing from {MODEL_DIR}; build it with "
                                "`python -m vtw.embedded.train` (deterministic, a few minutes on CPU)")
    return MODEL_DIR


def load(device="cpu", dtype=None, attn_implementation: str = "sdpa"):
    """Loads the embedded model and its processor the way any Hugging Face model is loaded
    (``AutoModelForImageTextToText`` / ``AutoProcessor``); returns ``(model, processor)``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    folder = path()
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype or torch.float32,
                                                            attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), processor


__all__ = ["MODEL_DIR", "load", "path"]
