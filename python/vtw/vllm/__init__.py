"""Visual Tokens Withdrawal inside vLLM (the V1 engine), as a general plugin.

vLLM loads this plugin in every process it starts (entry point ``vllm.general_plugins``:
``vtw = vtw.vllm:register``). It is switched on per model by the model config::

    LLM(model, hf_overrides={"vtw_layer": K, "vtw_kv": "shared"})
    python -m vllm.entrypoints.openai.api_server --model MODEL --hf-overrides '{"vtw_layer": K}'

``K`` is 0-based as in :func:`vtw.enable`: decoder layers ``>= K`` run on the text tokens only
(every visual token is withdrawn at layer K). Without ``vtw_layer``, or with ``K`` equal to the
number of decoder layers, nothing is patched on that engine: it runs exactly as stock vLLM.

KV modes (``vtw_kv``):

- ``"shared"``: the compute saving. The deep layers keep their KV in the same blocks as the
  shallow ones, in a compacted layout: a request's text token of rank r (its r-th text token)
  sits in slot r of the request's blocks, so the deep layers attend over exactly the request's
  text tokens so far.
- ``"text_only"`` (the default): the deep layers in KV cache groups of their own whose blocks
  hold the request's text tokens only, allocated for its text tokens only (see
  :mod:`vtw.vllm._text_only`), so more requests fit in the same KV memory. Same layout inside
  a block as "shared" (text rank r in slot r).

What the engine returns is what :func:`vtw.enable` computes on the same weights: at text
positions the withdrawn model's logits; at withdrawn positions (never sampled: a chunk of a
prompt ending on a visual token is a partial prefill) the early-exit value (the stream that
entered layer K through the final norm). A token carrying an image/video token id is withdrawn
wherever it appears, as in :func:`vtw.enable`.

Checks at engine start (when ``vtw_layer`` is given): the vLLM version (see
:mod:`vtw.vllm._version`), the model family, ``0 <= K <= L``, the KV mode, pipeline parallel
and speculative decoding (not supported). vLLM's compilation stays on: a step whose scheduled
tokens are all kept (every decode-only step) runs the compiled graph, a step with visual tokens
runs eagerly (see :mod:`vtw.vllm._runner`); on a GPU, full CUDA graphs become piecewise ones
(attention, which reads the deep layers' per-step metadata, outside the graphs). Prefix caching stays on, with hits capped at a request's first visual token (see
:mod:`vtw.vllm._prefix`).
"""

from __future__ import annotations

import logging

from ._version import SUPPORTED, check as check_version, is_supported

logger = logging.getLogger("vllm.vtw")

_registered = False


def register() -> None:
    """The plugin's entry point (vLLM calls it in every process; idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import _config

    _config.install(supported=is_supported())
    if is_supported():
        from . import _text_only, runners

        runners.install()
        _text_only.register()


__all__ = ["register", "SUPPORTED", "check_version"]
