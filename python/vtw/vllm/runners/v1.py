"""vLLM's V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` and the CPU runner
that subclasses it; vLLM 0.32's default on CPU, removed in 0.34).

Three hooks on the runner classes:

- ``load_model``: once the model is loaded, the shared wiring (:func:`vtw.vllm._runner.install_model`).
- ``_build_attention_metadata``: in a real step (not a dummy or capture run), after vLLM built
  its own metadata, the deep layers' view of the step from the runner's host buffers: which
  scheduled tokens are text (``input_ids`` on the host) and each request's text count before
  this step, recounted from its token history (``input_batch.token_ids_cpu`` over
  ``num_computed_tokens``), so preemption and recompute, reordering, aborts and chunked prefill
  need no bookkeeping. V1 keeps all of these on the host (vLLM's CPU platform turns async
  scheduling off, so the host token history is complete when the step is built).
- ``execute_model``: the step's view is dropped afterwards.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import _config, _runner

NAME = "V1 (vllm.v1.worker.gpu_model_runner)"


def available() -> bool:
    try:
        import vllm.v1.worker.gpu_model_runner  # noqa: F401
    except ImportError:
        return False
    return True


def _load(runner) -> None:
    s = _config.settings(runner.model_config)
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    _runner.install_model(model, s, NAME)
    model._vtw_wired = NAME


def _make_step(runner, st, num_tokens: int, num_reqs: int):
    ids = runner.input_ids.np[:num_tokens] if hasattr(runner.input_ids, "np") else runner.input_ids.cpu[:num_tokens].numpy()
    is_text = ~np.isin(ids, st.visual)
    qsl = runner.query_start_loc.np[: num_reqs + 1].astype(np.int64)
    n_sched = np.diff(qsl)
    batch = runner.input_batch
    nc = batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
    width = int(nc.max()) if num_reqs else 0
    if width:
        hist = batch.token_ids_cpu[:num_reqs, :width]
        past = np.arange(width)[None, :] < nc[:, None]
        text_before = (past & ~np.isin(hist, st.visual)).sum(1)
    else:
        text_before = np.zeros(num_reqs, dtype=np.int64)
    is_prefilling = ((nc + n_sched) < batch.num_prompt_tokens_cpu[:num_reqs]) \
        if hasattr(batch, "num_prompt_tokens_cpu") else None
    return _runner.make_step(
        st, is_text=is_text, n_sched=n_sched, text_before=text_before, is_prefilling=is_prefilling,
        attn_groups=runner.attn_groups,
        block_table=lambda gid: batch.block_table[gid].get_device_tensor(num_reqs),
        build=lambda ag, cm: ag.build_metadata(cm), device=runner.device)


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = [GPUModelRunner]
    try:  # the CPU runner overrides load_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except Exception:
        pass
    for cls in classes:
        if "load_model" in cls.__dict__:
            cls.load_model = _wrap_load(cls.__dict__["load_model"])
    orig_build = GPUModelRunner._build_attention_metadata
    orig_execute = GPUModelRunner.execute_model

    @functools.wraps(orig_build)
    def _build_attention_metadata(self, *args, **kwargs):
        out = orig_build(self, *args, **kwargs)
        st = _runner.state_of(self)
        if st is not None:
            st.step = None
            if (kwargs.get("num_scheduled_tokens") is not None and not kwargs.get("for_cudagraph_capture")
                    and kwargs.get("ubatch_slices") is None and not args):
                st.step = _make_step(self, st, kwargs["num_tokens"], kwargs["num_reqs"])
        return out

    @functools.wraps(orig_execute)
    def execute_model(self, *args, **kwargs):
        try:
            return orig_execute(self, *args, **kwargs)
        finally:
            st = _runner.state_of(self)
            if st is not None:
                st.step = None

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    GPUModelRunner.execute_model = execute_model


def _wrap_load(orig):
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        _load(self)
        return out

    return load_model
