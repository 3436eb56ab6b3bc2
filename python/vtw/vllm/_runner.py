"""The worker side: withdrawal inside the model's layer loop, fed by the model runner.

Two hooks on vLLM's ``GPUModelRunner`` (the CPU runner inherits them):

- ``load_model``: once the model is loaded, if its config asks for withdrawal, the language
  model's decoder layers ``>= K`` get a wrapper (an instance ``forward``; the classes are not
  touched, so another engine in the process stays stock).
- ``_build_attention_metadata``: in a real step (not a dummy or capture run), after vLLM built its
  own metadata, :func:`_make_step` computes on the host, from the runner's host buffers, which
  scheduled tokens are text, each request's text count before this step and the deep layers'
  attention metadata and slot mapping, and leaves them on the runner for the forward.

Per-request text counts are not carried between steps: each step recounts them from the
request's token history (``input_batch.token_ids_cpu`` over ``num_computed_tokens``), so
preemption and recompute, reordering of the batch, aborted requests and chunked prefill (an image
split across chunks, a chunk without any text) need no bookkeeping, and no block id is involved.
Nothing here reads device data on the host: the indices are built from host buffers and copied
to the device (CUDA graphs stay possible in principle; vtw runs eagerly, see _config).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _config

logger = logging.getLogger("vllm.vtw")


@dataclass
class _Step:
    keep: torch.Tensor | None  # [T] int64, flat indices of the text tokens of this step (device)
    num_text: int
    metadata: dict = field(default_factory=dict)  # deep layer name -> attention metadata
    slots: dict = field(default_factory=dict)  # deep layer name -> slot mapping [T]
    # filled by the layers during the forward
    full_hidden: torch.Tensor | None = None
    full_residual: torch.Tensor | None = None
    positions: torch.Tensor | None = None


class _State:
    def __init__(self, settings: _config.Settings, layers, start: int, end: int, names: dict):
        self.settings = settings
        self.layers = layers
        self.start, self.end = start, end
        self.names = names  # layer index -> attention layer name
        self.visual = np.asarray(settings.token_ids, dtype=np.int64)
        self.step: _Step | None = None
        self.groups: list = []  # (kv_cache_gid, attn_group, [deep layer names]) once the KV cache is known


def _language_layers(model):
    lm = model.get_language_model() if hasattr(model, "get_language_model") else model.language_model
    inner = getattr(lm, "model", lm)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"vtw.vllm: cannot find the decoder layers of {type(lm).__name__}")
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(layers))
    return layers, start, end


def _attn_name(layer) -> str:
    attn = getattr(getattr(layer, "self_attn", None), "attn", None)
    name = getattr(attn, "layer_name", None)
    if name is None:
        raise RuntimeError(f"vtw.vllm: decoder layer {type(layer).__name__} has no self_attn.attn.layer_name")
    return name


def _uninstall_model(runner) -> None:
    st = getattr(runner, "_vtw", None)
    if st is not None:
        for i in st.names:
            lay = st.layers[i]
            fwd = lay.__dict__.get("forward")
            if isinstance(fwd, functools.partial) and fwd.func is _layer_forward:
                del lay.forward
    runner._vtw = None


def set_layer(runner, layer: int) -> None:
    """Re-wires a loaded engine's model to withdraw at `layer` (``L``: stock), between
    workloads (no request in flight). For tests and benchmarks, which would otherwise start one
    engine per K; the engine must have been started with a vtw_layer < L (so the engine-start
    adjustments of _config.verify are in force)."""
    s = _config.settings(runner.model_config)
    if s is None or not s.active:
        raise RuntimeError("vtw.vllm.set_layer: the engine was not started with a vtw_layer < L")
    if s.kv == "text_only":
        raise RuntimeError("vtw.vllm.set_layer: with text_only the KV cache groups are laid out for the "
                           "engine's vtw_layer; start an engine per K")
    if not 0 <= layer <= s.num_layers:
        raise ValueError(f"vtw.vllm.set_layer: layer must be in [0, {s.num_layers}], got {layer}")
    from dataclasses import replace

    _uninstall_model(runner)
    _install_model(runner, replace(s, layer=layer))


def _install_model(runner, s: _config.Settings | None = None) -> None:
    if s is None:
        s = _config.settings(runner.model_config)
    runner._vtw = None
    if s is None or not s.active:
        return
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    layers, start, end = _language_layers(model)
    if len(layers) != s.num_layers:
        raise RuntimeError(f"vtw.vllm: the config says {s.num_layers} decoder layers, the model has {len(layers)}")
    names = {i: _attn_name(layers[i]) for i in range(max(start, s.layer), end)}
    st = _State(s, layers, start, end, names)
    if s.kv == "text_only":
        _text_only_specs(model, layers, range(max(start, s.layer), end), s.token_ids)
    for i in range(max(start, s.layer), end):
        lay = layers[i]
        if "forward" in lay.__dict__:
            raise RuntimeError(f"vtw.vllm: decoder layer {i} already has a patched forward")
        lay.forward = functools.partial(_layer_forward, st, i, lay.forward)
    runner._vtw = st


def _text_only_specs(model, layers, deep, token_ids) -> None:
    """The deep attention layers report a TextOnlyAttentionSpec (their own KV cache groups)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ._text_only import TextOnlyAttentionSpec

    for i in deep:
        attn = layers[i].self_attn.attn
        if "get_kv_cache_spec" in attn.__dict__:
            continue
        orig = attn.get_kv_cache_spec

        def spec(vllm_config, _orig=orig, _i=i):
            base = _orig(vllm_config)
            if base is None or type(base) is not FullAttentionSpec or base.sliding_window is not None:
                raise RuntimeError(f"vtw.vllm: decoder layer {_i} has KV spec {type(base).__name__} "
                                   f"(sliding window: {getattr(base, 'sliding_window', None)}); text_only needs "
                                   'plain full attention from vtw_layer on (or pass "vtw_kv": "shared")')
            return TextOnlyAttentionSpec.from_spec(base, token_ids)

        attn.get_kv_cache_spec = spec


def _deep_groups(runner, st: _State):
    if st.groups:
        return st.groups
    deep = set(st.names.values())
    out = []
    for gid, row in enumerate(runner.attn_groups):
        for ag in row:
            mine = [n for n in ag.layer_names if n in deep]
            if not mine:
                continue
            if getattr(ag, "kernel_block_size", None) is not None:
                raise RuntimeError("vtw.vllm: the attention backend splits KV blocks into kernel blocks; "
                                   "vtw's deep-layer slot mapping does not support that yet")
            out.append((gid, ag, mine))
    st.groups = out
    return out


def _make_step(runner, st: _State, num_tokens: int, num_reqs: int) -> _Step:
    """The deep layers' view of this step, from the runner's host buffers."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    dev = runner.device
    ids = runner.input_ids.np[:num_tokens] if hasattr(runner.input_ids, "np") else runner.input_ids.cpu[:num_tokens].numpy()
    is_text = ~np.isin(ids, st.visual)
    qsl = runner.query_start_loc.np[: num_reqs + 1].astype(np.int64)
    n_sched = np.diff(qsl)
    keep = np.flatnonzero(is_text)
    T = int(keep.size)
    if T == 0:
        return _Step(keep=None, num_text=0)
    # text tokens of each request before this step, recounted from its token history
    batch = runner.input_batch
    nc = batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
    width = int(nc.max()) if num_reqs else 0
    if width:
        hist = batch.token_ids_cpu[:num_reqs, :width]
        past = np.arange(width)[None, :] < nc[:, None]
        text_before = (past & ~np.isin(hist, st.visual)).sum(1)
    else:
        text_before = np.zeros(num_reqs, dtype=np.int64)
    req_of_tok = np.repeat(np.arange(num_reqs), n_sched)[keep]
    n_text = np.bincount(req_of_tok, minlength=num_reqs)
    first = np.concatenate([[0], np.cumsum(n_text)[:-1]])  # index in `keep` of each request's first text token
    rank = text_before[req_of_tok] + (np.arange(T) - first[req_of_tok])  # text rank of each kept token
    sel = np.flatnonzero(n_text > 0)  # requests with a text token in this step, in batch order
    R = int(sel.size)
    dqsl = np.zeros(R + 1, dtype=np.int32)
    dqsl[1:] = np.cumsum(n_text[sel])
    dseq = (text_before + n_text)[sel].astype(np.int32)
    dqsl_cpu = torch.from_numpy(dqsl)
    dseq_cpu = torch.from_numpy(dseq)
    sel_t = torch.from_numpy(sel).to(dev)
    step = _Step(keep=torch.from_numpy(keep).to(dev), num_text=T)
    is_prefilling = torch.from_numpy((nc + n_sched)[sel] < batch.num_prompt_tokens_cpu[:num_reqs][sel]) \
        if hasattr(batch, "num_prompt_tokens_cpu") else None
    for gid, ag, names in _deep_groups(runner, st):
        table = batch.block_table[gid]
        bs = table.block_size
        bt_np = table.get_numpy_array()[:num_reqs]
        slots_np = bt_np[req_of_tok, rank // bs].astype(np.int64) * bs + rank % bs
        slots = torch.from_numpy(slots_np).to(dev)
        bt = table.get_device_tensor(num_reqs)[sel_t]
        cm = CommonAttentionMetadata(
            query_start_loc=dqsl_cpu.to(dev), query_start_loc_cpu=dqsl_cpu,
            seq_lens=dseq_cpu.to(dev), seq_lens_cpu_upper_bound=dseq_cpu,
            num_reqs=R, num_actual_tokens=T, max_query_len=int(n_text[sel].max()),
            max_seq_len=int(dseq.max()), block_table_tensor=bt, slot_mapping=slots, causal=True,
            is_prefilling=is_prefilling)
        md = ag.build_metadata(cm)
        for n in names:
            step.metadata[n] = md
            step.slots[n] = slots
    return step


def _layer_forward(st: _State, idx: int, orig, positions, hidden_states, residual, *args, **kwargs):
    step = st.step
    if step is None:  # a dummy run (profiling, warm-up): no request, run the layer as it is
        return orig(positions, hidden_states, residual, *args, **kwargs)
    K = max(st.settings.layer, st.start)
    last = st.end - 1
    if idx == K:
        step.full_hidden, step.full_residual = hidden_states, residual
        if step.num_text:
            keep = step.keep
            hidden_states = hidden_states.index_select(0, keep)
            residual = residual.index_select(0, keep) if residual is not None else None
            step.positions = positions.index_select(-1, keep)  # [N] or M-RoPE's [3, N]
            from vllm.forward_context import get_forward_context

            ctx = get_forward_context()
            for n, md in step.metadata.items():
                ctx.attn_metadata[n] = md
                ctx.slot_mapping[n] = step.slots[n]
    if step.num_text:
        hidden_states, residual = orig(step.positions, hidden_states, residual, *args, **kwargs)
    if idx != last:
        return hidden_states, residual
    # the last layer: back to the batch's [N, D] layout (withdrawn rows: the stream that entered
    # layer K, which the final norm turns into the early-exit value)
    full_h, full_r = step.full_hidden, step.full_residual
    if full_r is None:  # K == 0: no residual stream yet
        full_r = torch.zeros_like(full_h)
    if not step.num_text:
        return full_h, full_r
    out_h = full_h.index_copy(0, step.keep, hidden_states.to(full_h.dtype))
    out_r = full_r.index_copy(0, step.keep, residual.to(full_r.dtype))
    step.full_hidden = step.full_residual = None
    return out_h, out_r


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
        st = getattr(self, "_vtw", None)
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
            st = getattr(self, "_vtw", None)
            if st is not None:
                st.step = None

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    GPUModelRunner.execute_model = execute_model


def _wrap_load(orig):
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        _install_model(self)
        return out

    return load_model
