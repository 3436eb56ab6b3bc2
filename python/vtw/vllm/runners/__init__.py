"""Where withdrawal is wired into vLLM's model runners: one module per runner (:mod:`.v1`,
:mod:`.mrv2`), and the check that makes vtw never silent.

After the model is loaded, in every worker, :func:`check_wired` looks at the runner actually in
use: when the model config asks for withdrawal and that runner did not wire it (an unknown
runner, a vLLM version whose runner vtw does not hook), the worker refuses to start with a
one-line error naming the runner and the vLLM version. The "visual tokens withdrawn from decoder
layer K" log is written only there, once the wiring succeeded.
"""

from __future__ import annotations

import functools
import logging

from .. import _config, _runner

logger = logging.getLogger("vllm.vtw")


def runner_name(runner) -> str:
    cls = type(runner)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_wired(runner) -> None:
    """Raises unless withdrawal (when asked for) is wired into `runner`; logs the outcome."""
    from .._version import installed

    vc = getattr(runner, "vllm_config", None)
    mc = getattr(runner, "model_config", None) or getattr(vc, "model_config", None)
    if mc is None:
        return
    s = _config.settings(mc)
    if s is None:
        return
    model = runner.get_model() if hasattr(runner, "get_model") else getattr(runner, "model", None)
    if not s.active:
        logger.info("vtw.vllm: %s, vtw_layer = %d = the number of decoder layers: withdrawal is off "
                    "(stock vLLM)", s.family, s.layer)
        return
    wired = getattr(model, "_vtw_wired", None)
    st = getattr(model, "_vtw_state", None)
    if not wired or st is None:
        raise RuntimeError(f"vtw.vllm: withdrawal (vtw_layer={s.layer}) is not wired into the model runner in use, "
                           f"{runner_name(runner)}, on vLLM {installed()}; vtw hooks only "
                           f"{' and '.join(_KNOWN)}; refusing to run the stock model silently (drop vtw_layer to "
                           "run stock vLLM)")
    logger.info("vtw.vllm: %s, visual tokens withdrawn from decoder layer %d of %d (kv: %s; runner: %s)",
                s.family, s.layer, s.num_layers, s.kv, wired)


_KNOWN: list[str] = []
_installed = False


def install() -> None:
    """Hooks every runner this vLLM has, and the worker-side check."""
    global _installed
    if _installed:
        return
    _installed = True
    from . import mrv2, v1

    for mod in (v1, mrv2):
        if mod.available():
            mod.install()
            _KNOWN.append(mod.NAME)
    from vllm.v1.worker.gpu_worker import Worker

    orig = Worker.load_model

    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        check_wired(self.model_runner)
        return out

    Worker.load_model = load_model


__all__ = ["install", "check_wired", "runner_name"]
