"""vLLM's Model Runner V2 (MRv2: ``vllm.v1.worker.gpu.model_runner.GPUModelRunner`` and its CPU
subclass; what vLLM 0.32 runs on every GPU, and the only runner of vLLM 0.34).

Wired through the extension point MRv2 offers: a model that has ``get_model_state_cls`` supplies
its own ``ModelState``. vtw sets it on the loaded model instance (other engines in the process
stay stock), between the model load and MRv2's ``init_model_state`` call, and
:class:`VtwModelState` (vLLM's ``DefaultModelState`` plus vtw) builds, in ``prepare_attn``, the
deep KV groups' metadata next to vLLM's own: query starts over the kept tokens, sequence lengths
= the request's text tokens so far, block tables, slots at the text rank.

Where the text counts come from, without reading device data: MRv2 keeps sampled tokens and
block tables on the device, but every token that is not a fresh sample reaches the runner from
the host, as the request's ``prefill_token_ids`` (``add_request``: the prompt, and after a
preemption the prompt plus the tokens generated so far). The state keeps, per request, the
running count of visual tokens over those prefill tokens (host numpy); a scheduled token below
the prefill length is text or visual by that table. A token past it was sampled on the device
(a decode step's input): it is kept for the deep layers on the host side, and a device-side
check (its id against the image/video token ids) marks it withdrawn after all when the model
generated a visual token id: no deep KV slot (vLLM's padding slot), the early-exit value as its
output, and a per-request device counter of such tokens that is subtracted from the request's
host text count in later steps (ranks, slots and sequence lengths computed on the device). So a
step needs only host values MRv2 already has in its ``InputBatch`` (``num_computed_tokens_np``,
``num_scheduled_tokens``, batch order, ``is_prefilling_np``) and device arithmetic: no host
synchronisation. Preemption and recompute re-add the request with its tokens so far (the table
is rebuilt, the counter reset), an abort or a finish removes it (``remove_request``), reordering
is the batch order of the step, chunked prefill is a position range.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from .. import _config, _runner

logger = logging.getLogger("vllm.vtw")

NAME = "Model Runner V2 (vllm.v1.worker.gpu.model_runner)"


def available() -> bool:
    try:
        import vllm.v1.worker.gpu.model_runner  # noqa: F401
        import vllm.v1.worker.gpu.model_states  # noqa: F401
    except ImportError:
        return False
    return True


class _Req:
    __slots__ = ("visual_before", "prefill_len")

    def __init__(self, prefill_token_ids, visual):
        ids = np.asarray(prefill_token_ids, dtype=np.int64)
        # visual_before[p]: visual tokens among the first p prefill tokens
        self.visual_before = np.concatenate([[0], np.cumsum(np.isin(ids, visual))]).astype(np.int64)
        self.prefill_len = int(ids.size)


_state_classes: dict = {}


def _state_class(base):
    """vtw's ModelState on top of the one MRv2 would have used for this model."""
    cls = _state_classes.get(base)
    if cls is not None:
        return cls

    class VtwModelState(base):
        """``base`` plus the deep KV groups' metadata (see the module's docstring)."""

        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            import torch

            self._vtw_reqs: dict[str, _Req] = {}
            # per request slot: visual token ids the model generated since the request's prefill
            self._vtw_generated_visual = torch.zeros(self.max_num_reqs, dtype=torch.int64, device=device)
            self._vtw_visual_ids = torch.tensor(
                _config.visual_token_ids(self.model_config.hf_config), dtype=torch.int64, device=device)

        def add_request(self, req_index, new_req_data):
            super().add_request(req_index, new_req_data)
            st = getattr(self.model, "_vtw_state", None)
            visual = st.visual if st is not None else np.asarray(
                _config.visual_token_ids(self.model_config.hf_config), dtype=np.int64)
            self._vtw_reqs[new_req_data.req_id] = _Req(new_req_data.prefill_token_ids, visual)
            self._vtw_generated_visual[req_index] = 0

        def remove_request(self, req_id):
            super().remove_request(req_id)
            self._vtw_reqs.pop(req_id, None)

        def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                         kv_cache_config, for_capture=False, ubatch_idx=0, **kwargs):
            md = super().prepare_attn(input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                                      kv_cache_config, for_capture=for_capture, ubatch_idx=ubatch_idx, **kwargs)
            st = getattr(self.model, "_vtw_state", None)
            if st is None:
                return md
            st.step = None
            reqs = [self._vtw_reqs.get(r) for r in input_batch.req_ids]
            # capture and dummy batches (profiling, warm-up: request ids vtw was never given) run
            # every layer on every token, as stock
            if for_capture or ubatch_idx != 0 or not reqs or any(r is None for r in reqs):
                return md
            st.step = _make_step(self, st, input_batch, reqs, block_tables, attn_groups, ubatch_idx)
            st.step.owner = md
            return md

    VtwModelState.__qualname__ = VtwModelState.__name__ = f"Vtw{base.__name__}"
    _state_classes[base] = VtwModelState
    return VtwModelState


def _make_step(ms, st, input_batch, reqs, block_tables, attn_groups, ubatch_idx):
    import torch

    num_reqs = input_batch.num_reqs
    n_sched = np.asarray(input_batch.num_scheduled_tokens[:num_reqs], dtype=np.int64)
    nc = np.asarray(input_batch.num_computed_tokens_np[:num_reqs], dtype=np.int64)
    num_tokens = int(input_batch.num_tokens)
    is_text = np.ones(num_tokens, dtype=bool)
    text_before = np.empty(num_reqs, dtype=np.int64)
    sampled = np.zeros(num_tokens, dtype=bool)  # tokens past the prefill: sampled on the device
    start = 0
    for i, r in enumerate(reqs):
        c, n, P = int(nc[i]), int(n_sched[i]), r.prefill_len
        vb = r.visual_before
        text_before[i] = c - int(vb[min(c, P)])
        hi = min(c + n, P)
        if hi > c:  # scheduled prefill tokens: visual or not by the host table
            is_text[start: start + hi - c] = np.diff(vb[c: hi + 1]) == 0
        if c + n > P:
            sampled[start + max(P - c, 0): start + n] = True
        start += n
    dev = input_batch.query_start_loc.device
    idx_mapping = input_batch.idx_mapping[:num_reqs]
    counter = ms._vtw_generated_visual
    input_ids = input_batch.input_ids

    def correction(keep, req_of_tok):
        shift = counter[idx_mapping]  # a copy: generated visual ids before this step
        in_keep = np.flatnonzero(sampled[keep])  # sampled tokens are always kept
        withdrawn = torch.zeros(keep.size, dtype=torch.bool, device=dev)
        if in_keep.size:
            pos = torch.from_numpy(keep[in_keep]).to(dev)
            vis = torch.isin(input_ids[pos].to(torch.int64), ms._vtw_visual_ids)
            withdrawn[torch.from_numpy(in_keep).to(dev)] = vis
            counter.index_add_(0, idx_mapping[torch.from_numpy(req_of_tok[in_keep]).to(dev)], vis.to(counter.dtype))
        return shift, withdrawn

    return _runner.make_step(
        st, is_text=is_text, n_sched=n_sched, text_before=text_before,
        is_prefilling=np.asarray(input_batch.is_prefilling_np[:num_reqs]),
        attn_groups=attn_groups, block_table=lambda gid: block_tables[gid],
        build=lambda ag, cm: ag.build_metadata(cm, ubatch_idx), device=dev, device_correction=correction)


def _wire(vllm_config, model) -> None:
    """Between the model load and MRv2's ModelState: sets vtw's ModelState on this model instance."""
    s = _config.settings(vllm_config.model_config)
    model._vtw_wired = None
    if s is None:
        return
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    base = resolve_model_state_cls(vllm_config, model)
    if not issubclass(base, DefaultModelState):
        raise RuntimeError(f"vtw.vllm: Model Runner V2 would run this model with {base.__name__}; vtw wires into "
                           "DefaultModelState only; drop vtw_layer to run it as stock vLLM")
    cc = vllm_config.compilation_config
    max_tokens = max([vllm_config.scheduler_config.max_num_batched_tokens, *(cc.cudagraph_capture_sizes or [])])
    st = _runner.install_model(model, s, NAME, max_tokens=max_tokens)
    if st is not None:
        cls = _state_class(base)
        model.get_model_state_cls = lambda: cls
    model._vtw_wired = NAME


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    import vllm.v1.worker.gpu.model_runner as mr

    orig_init = mr.init_model_state

    @functools.wraps(orig_init)
    def init_model_state(vllm_config, model, encoder_cache, device):
        _wire(vllm_config, model)
        state = orig_init(vllm_config, model, encoder_cache, device)
        st = getattr(model, "_vtw_state", None)
        if st is not None and not isinstance(state, tuple(_state_classes.values())):
            model._vtw_wired = None  # the worker's check refuses to start, naming the runner
        return state

    mr.init_model_state = init_model_state
