"""The worker side, shared by every model runner: withdrawal inside the model's layer loop.

Once the model is loaded, if its config asks for withdrawal, decoder layer ``K`` of the language
model gets a wrapper that runs layers ``K..L-1`` itself (the later layers' own ``forward``
becomes a pass-through), and the model gets a wrapper around its ``forward`` (instance
attributes; the classes are not touched, so another engine in the process stays stock). Per
step, a runner-specific module (:mod:`vtw.vllm.runners.v1` for vLLM's V1 runner,
:mod:`vtw.vllm.runners.mrv2` for Model Runner V2) tells :func:`make_step`, from host data the
runner already holds, which scheduled tokens are text and how many text tokens each request had
before this step; :func:`make_step` builds the deep layers' view of the step (the kept tokens,
their text rank, the deep KV groups' attention metadata and slot mapping).

Two ways through the deep layers, chosen per step on the host:

- every scheduled token kept (every decode-only step, text-only prefill): the gather at layer K
  is the identity, so the layers run on the whole batch as in stock vLLM and the step runs
  vLLM's compiled graph; only the deep layers' attention metadata and slots differ, and those
  are read by vLLM's attention ops from the forward context, which the model wrapper fills
  before the forward. A token the runner could only check on the device (MRv2: a sampled id
  that turns out visual) leaves with the stream that entered layer K through a ``where`` on a
  persistent mask, inside the graph.
- a step with visual tokens: the kept-token count is data, so the step runs eagerly (vLLM's
  ``ForwardContext.skip_compiled``, as vLLM does for encoder-decoder steps with encoder input):
  gather at layer K, the deep layers on the kept tokens with their own metadata, scatter back to
  the batch's ``[N, D]`` layout after the last layer.

Deep sliding-window layers whose window can bind (Gemma 3 with max_model_len > sliding_window)
keep their KV by position and attend over original positions through :mod:`vtw.vllm._window`;
:func:`_inject` gives them the step's kept tokens' stock slots and positions.

Nothing here reads device data on the host: the per-token indices are built on the host and
copied to the device, the deep slots are gathered from the device block tables on the device.
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
    # the attention metadata dict of the step this view belongs to (MRv2: a forward with another
    # dict, e.g. a dummy run that built none, runs stock); None: not checked (V1 clears the view)
    owner: object = None
    withdrawn: torch.Tensor | None = None  # [T] bool (device): kept tokens that leave with the early-exit value
    identity: bool = False  # every scheduled token kept: the compiled graph can run this step
    injected: bool = False  # the deep metadata is in the forward context
    # positional deep groups (vtw.vllm._window): (gid, WindowMetadata, [layer names]); their slots
    # and positions come from the forward context and the forward's positions (_inject)
    positional: list = field(default_factory=list)


class _State:
    def __init__(self, settings: _config.Settings, layers, start: int, end: int, names: dict, runner_name: str):
        self.settings = settings
        self.layers = layers
        self.start, self.end = start, end
        self.names = names  # layer index -> attention layer name
        self.visual = np.asarray(settings.token_ids, dtype=np.int64)
        self.runner_name = runner_name
        self.step: _Step | None = None
        self.groups: list = []  # (kv_cache_gid, attn_group, [deep layer names]) once the KV cache is known
        # the per-step figure: tokens the deep layers ran on in the last real step, and in total
        self.last_deep_tokens: int | None = None
        self.deep_tokens_total = 0
        self.steps = 0
        # MRv2: [max tokens] bool, persistent (the compiled graph reads it): kept tokens withdrawn on
        # the device in a step that runs every token through the deep layers
        self.withdrawn_buf: torch.Tensor | None = None
        # steps that ran the language model's compiled graph / eagerly (see the module docstring)
        self.compiled_steps = 0
        self.eager_steps = 0
        self.compiles = False  # the engine compiles the language model (vLLM's compilation on)
        self.traced = False  # a real step of > 1 token has run the compiled graph
        # Qwen3-VL's DeepStack with K inside its layers: the model holding the per-level buffers
        # (see install_model); None otherwise
        self.deepstack = None
        # deep sliding-window layers whose window binds (vtw.vllm._window): layer index -> window;
        # their KV cache group ids -> the groups' slot flags, once the KV cache is known
        self.positional: dict = dict(settings.windows)
        self.positional_names = {names[i] for i in self.positional if i in names}
        self.slot_flags: dict = {}


def language_layers(model):
    lm = model.get_language_model() if hasattr(model, "get_language_model") else model.language_model
    inner = getattr(lm, "model", lm)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"vtw.vllm: cannot find the decoder layers of {type(lm).__name__}")
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(layers))
    return layers, start, end, inner


def _attn_name(layer) -> str:
    attn = getattr(getattr(layer, "self_attn", None), "attn", None)
    name = getattr(attn, "layer_name", None)
    if name is None:
        raise RuntimeError(f"vtw.vllm: decoder layer {type(layer).__name__} has no self_attn.attn.layer_name")
    return name


def uninstall_model(model) -> None:
    st = getattr(model, "_vtw_state", None)
    if st is not None:
        for i in st.names:
            lay = st.layers[i]
            fwd = lay.__dict__.get("forward")
            if isinstance(fwd, functools.partial) and fwd.func in (_deep_forward, _pass_through):
                del lay.forward
        fwd = model.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is _model_forward:
            del model.forward
        from ._window import WindowImpl

        for i in st.positional:
            attn = st.layers[i].self_attn.attn
            if isinstance(attn.impl, WindowImpl):
                attn.impl = attn.impl.inner
    model._vtw_state = None


def _compiles(inner) -> bool:
    """Whether vLLM compiles `inner`, the module holding the decoder layers (its
    ``support_torch_compile`` decorator sets ``do_not_compile``; eager engines and undecorated
    models have it True / absent)."""
    return getattr(inner, "do_not_compile", True) is False


def install_model(model, s: _config.Settings, runner_name: str, *, max_tokens: int | None = None) -> _State | None:
    """Wires the withdrawal `s` asks for into `model` (None when `s` withdraws nothing). The
    state is kept on the model instance. `max_tokens`: the most tokens a step can carry, for a
    runner that withdraws sampled tokens on the device (MRv2), which then get a persistent mask."""
    model._vtw_state = None
    if s is None or not s.active:
        return None
    layers, start, end, inner = language_layers(model)
    if len(layers) != s.num_layers:
        raise RuntimeError(f"vtw.vllm: the config says {s.num_layers} decoder layers, the model has {len(layers)}")
    deep = range(max(start, s.layer), end)
    names = {i: _attn_name(layers[i]) for i in deep}
    st = _State(s, layers, start, end, names, runner_name)
    st.compiles = _compiles(inner)
    if max_tokens is not None:
        device = next(iter(model.parameters())).device
        st.withdrawn_buf = torch.zeros(int(max_tokens), dtype=torch.bool, device=device)
    # Qwen3-VL's DeepStack: vLLM's language model adds buffer i (the vision features at visual
    # positions, zero elsewhere) to the hidden states after loop index i. With K inside those
    # layers, the additions i >= K come after layer K's call, which has run the deep layers: + 0 on
    # the kept (text) rows, but the withdrawn rows would leave with the early-exit value plus those
    # features, and a prompt that ends on a visual token samples from that row. The withdrawn
    # model skips DeepStack from K on: the levels >= K are zeroed before the forward.
    bufs = getattr(model, "deepstack_input_embeds", None)
    if isinstance(bufs, list) and s.layer < len(bufs):
        st.deepstack = model
    if st.positional:
        from ._window import WindowImpl, check_layer

        for i, window in st.positional.items():
            attn = layers[i].self_attn.attn
            if getattr(attn, "sliding_window", None) != window:
                raise RuntimeError(f"vtw.vllm: decoder layer {i} should slide a window of {window} tokens, its attention "
                                   f"has sliding_window={getattr(attn, 'sliding_window', None)}")
            check_layer(attn, f"decoder layer {i}")
            attn.impl = WindowImpl(attn.impl, window)  # block size: from its KV group (deep_groups)
    if s.kv == "text_only":
        _text_only_specs(layers, [i for i in deep if i not in st.positional], s.token_ids)
    for i in deep:
        if "forward" in layers[i].__dict__:
            raise RuntimeError(f"vtw.vllm: decoder layer {i} already has a patched forward")
    if "forward" in model.__dict__:
        raise RuntimeError(f"vtw.vllm: {type(model).__name__} already has a patched forward")
    forwards = tuple(layers[i].forward for i in deep)
    layers[deep[0]].forward = functools.partial(_deep_forward, st, forwards)
    for i in deep[1:]:
        layers[i].forward = functools.partial(_pass_through, st)
    model.forward = functools.partial(_model_forward, st, model.forward)
    model._vtw_state = st
    return st


def state_of(runner) -> _State | None:
    model = getattr(runner, "model", None)
    return getattr(model, "_vtw_state", None) if model is not None else None


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
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    if _compiles(language_layers(model)[3]):
        raise RuntimeError("vtw.vllm.set_layer: this engine compiles the language model, and the compiled graph "
                           "holds the layer wiring it was traced with; start an engine per K, or one with "
                           "enforce_eager=True to re-wire it")
    from dataclasses import replace

    old = getattr(model, "_vtw_state", None)
    name = old.runner_name if old is not None else type(runner).__name__
    max_tokens = old.withdrawn_buf.numel() if old is not None and old.withdrawn_buf is not None else None
    uninstall_model(model)
    windows = _config.binding_windows(runner.model_config, layer)
    install_model(model, replace(s, layer=layer, windows=windows), name, max_tokens=max_tokens)  # K = L: stock


def _text_only_specs(layers, deep, token_ids) -> None:
    """The deep attention layers report a TextOnlyAttentionSpec (their own KV cache groups);
    full attention only, or a sliding window that cannot bind (max_model_len <= window). (Deep
    sliding layers whose window binds keep vLLM's sliding-window spec: vtw.vllm._window.)"""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from ._text_only import TextOnlyAttentionSpec

    for i in deep:
        attn = layers[i].self_attn.attn
        if "get_kv_cache_spec" in attn.__dict__:
            continue
        orig = attn.get_kv_cache_spec

        def spec(vllm_config, _orig=orig, _i=i):
            base = _orig(vllm_config)
            # a sliding window that cannot bind (max_model_len <= window, _config.binding_windows)
            # is full attention: the same text-only group
            unbound = (type(base) is SlidingWindowSpec
                       and base.sliding_window >= int(vllm_config.model_config.max_model_len))
            if base is None or not unbound and (type(base) is not FullAttentionSpec or base.sliding_window is not None):
                raise RuntimeError(f"vtw.vllm: decoder layer {_i} has KV spec {type(base).__name__} "
                                   f"(sliding window: {getattr(base, 'sliding_window', None)}); text_only needs "
                                   'plain full attention from vtw_layer on (or pass "vtw_kv": "shared")')
            return TextOnlyAttentionSpec.from_spec(base, token_ids)

        attn.get_kv_cache_spec = spec


def deep_groups(st: _State, attn_groups):
    """(KV cache group id, attention group, [its deep layer names]) of the deep layers."""
    if st.groups:
        return st.groups
    deep = set(st.names.values())
    out = []
    for gid, row in enumerate(attn_groups):
        for ag in row:
            mine = [n for n in ag.layer_names if n in deep]
            if not mine:
                continue
            if getattr(ag, "kernel_block_size", None) is not None:
                raise RuntimeError("vtw.vllm: the attention backend splits KV blocks into kernel blocks; "
                                   "vtw's deep-layer slot mapping does not support that yet")
            out.append((gid, ag, mine))
            pos = [n for n in mine if n in st.positional_names]
            if pos:
                if len(pos) != len(mine):
                    raise RuntimeError(f"vtw.vllm: KV cache group {gid} mixes deep layers that keep their KV by position "
                                       f"({', '.join(pos)}) and by text rank")
                _bind_window_group(st, gid, ag, pos)
    st.groups = out
    return out


def _bind_window_group(st: _State, gid: int, ag, names) -> None:
    """A positional deep group: its layers learn their block size, the group gets its slot flags."""
    from ._window import Slots, WindowImpl, _views

    bs = int(ag.kv_cache_spec.block_size)
    num_blocks = None
    for i, n in st.names.items():
        if n not in names:
            continue
        attn = st.layers[i].self_attn.attn
        impl = attn.impl
        if not isinstance(impl, WindowImpl):
            raise RuntimeError(f"vtw.vllm: decoder layer {i} lost vtw's sliding-window attention")
        impl.__dict__["block_size"] = bs
        kv = attn.kv_cache[0] if isinstance(attn.kv_cache, (list, tuple)) else attn.kv_cache
        nb = _views(kv, bs, impl.num_kv_heads, impl.head_size)[0].shape[0]
        num_blocks = nb if num_blocks is None else min(num_blocks, nb)
    st.slot_flags[gid] = Slots(num_blocks * bs, st.withdrawn_buf.device if st.withdrawn_buf is not None
                               else next(iter(st.layers.parameters())).device)


def make_step(st: _State, *, is_text: np.ndarray, n_sched: np.ndarray, text_before: np.ndarray,
              is_prefilling: np.ndarray | None, attn_groups, block_table, build, device,
              device_correction=None) -> _Step:
    """The deep layers' view of this step.

    is_text [num_tokens] (host): which scheduled tokens are text; n_sched [num_reqs]: tokens
    scheduled per request, in batch order; text_before [num_reqs]: each request's text tokens
    before this step; block_table(gid) -> the group's device block table, one row per request
    in batch order; build(attn_group, CommonAttentionMetadata) -> the backend's metadata.

    device_correction(keep, req_of_tok) -> (shift [num_reqs], withdrawn [T]), device tensors, for a
    runner whose host data cannot tell every token (MRv2: tokens sampled on the device): `shift`
    is subtracted from each request's host text count, `withdrawn` marks kept tokens that turn
    out visual (they get no deep KV slot and leave with the early-exit value)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    num_reqs = int(n_sched.shape[0])
    keep = np.flatnonzero(is_text)
    T = int(keep.size)
    st.last_deep_tokens = T
    st.deep_tokens_total += T
    st.steps += 1
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("vtw.vllm: step %d, deep layers (>= %d) run on %d of %d scheduled tokens",
                     st.steps, st.settings.layer, T, int(is_text.shape[0]))
    if T == 0:
        return _Step(keep=None, num_text=0)
    identity = T == int(is_text.shape[0])
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
    sel_t = torch.from_numpy(sel).to(device)
    req_t = torch.from_numpy(req_of_tok.astype(np.int64)).to(device)
    rank_t = torch.from_numpy(rank.astype(np.int64)).to(device)
    step = _Step(keep=torch.from_numpy(keep).to(device), num_text=T, identity=identity)
    dseq_t = dseq_cpu.to(device)
    withdrawn = None
    if device_correction is not None:
        shift, withdrawn = device_correction(keep, req_of_tok)
        rank_t = rank_t - shift[req_t]
        dseq_t = dseq_t - shift[sel_t].to(dseq_t.dtype)
        step.withdrawn = withdrawn
        if identity:  # the compiled graph reads the persistent mask (kept = scheduled tokens here)
            buf = st.withdrawn_buf
            buf[T:].zero_()
            buf[:T].copy_(withdrawn)
    prefilling = torch.from_numpy(np.ascontiguousarray(is_prefilling[sel])) if is_prefilling is not None else None
    # the same for every deep group: one copy each per step
    dqsl_t = dqsl_cpu.to(device)
    max_query_len, max_seq_len = int(n_text[sel].max()), int(dseq.max())
    for gid, ag, names in deep_groups(st, attn_groups):
        bt_all = block_table(gid)
        bs = ag.kv_cache_spec.block_size
        if gid in st.slot_flags:  # positional: slots and positions are the stock ones, gathered in _inject
            from ._window import WindowMetadata

            md = WindowMetadata(num_tokens=T, req=req_t, pos=None, block_table=bt_all, block_size=int(bs),
                                valid=st.slot_flags[gid].valid)
            step.positional.append((gid, md, names))
            continue
        # slot of text rank r: block_table[req, r // bs] * bs + r % bs, gathered on the device
        slots = bt_all[req_t, rank_t // bs].to(torch.int64) * bs + rank_t % bs
        if withdrawn is not None:  # no KV slot for a token withdrawn after all (-1: vLLM's padding slot)
            slots = torch.where(withdrawn, torch.full_like(slots, -1), slots)
        cm = CommonAttentionMetadata(
            query_start_loc=dqsl_t, query_start_loc_cpu=dqsl_cpu,
            seq_lens=dseq_t, seq_lens_cpu_upper_bound=dseq_cpu,
            num_reqs=R, num_actual_tokens=T, max_query_len=max_query_len,
            max_seq_len=max_seq_len, block_table_tensor=bt_all[sel_t], slot_mapping=slots, causal=True,
            is_prefilling=prefilling)
        md = build(ag, cm)
        for n in names:
            step.metadata[n] = md
            step.slots[n] = slots
    return step


def _inject(step: _Step, ctx, st: _State | None = None, positions=None) -> None:
    """The deep layers' attention metadata and slots into the forward context (vLLM's attention
    ops read both by layer name). Positional groups (vtw.vllm._window): the group's stock slot
    mapping, read here before it is replaced, marks which slots the step fills with a kept token's
    KV; the kept tokens keep their stock slots and positions."""
    if step.injected:
        return
    for n, md in step.metadata.items():
        ctx.attn_metadata[n] = md
        ctx.slot_mapping[n] = step.slots[n]
    for gid, md, names in step.positional:
        stock = ctx.slot_mapping[names[0]]
        if positions is None or positions.dim() != 1:
            raise RuntimeError("vtw.vllm: deep sliding-window layers need the forward's 1-D positions")
        n_all = stock.shape[0]
        if step.identity:
            kept = torch.ones(n_all, dtype=torch.bool, device=stock.device)
            if step.withdrawn is not None:  # MRv2: tokens withdrawn on the device get no slot
                kept[: step.num_text] = ~step.withdrawn
            kept[step.num_text:] = False
            slots = torch.where(kept, stock, torch.full_like(stock, -1))
            md.pos = positions[: step.num_text].to(torch.int64)
        else:
            kept = torch.zeros(n_all, dtype=torch.bool, device=stock.device)
            kept[step.keep] = True
            slots = stock.index_select(0, step.keep)
            if step.withdrawn is not None:
                kept[step.keep] = ~step.withdrawn
                slots = torch.where(step.withdrawn, torch.full_like(slots, -1), slots)
            md.pos = positions.index_select(0, step.keep).to(torch.int64)
        st.slot_flags[gid].mark(stock, kept)
        for n in names:
            ctx.attn_metadata[n] = md
            ctx.slot_mapping[n] = slots
    step.injected = True


def _model_forward(st: _State, orig, *args, **kwargs):
    """The model's forward: the step's deep metadata into the forward context, and the step's
    way through the deep layers (compiled graph or eager; see the module docstring)."""
    step = st.step
    if step is not None:
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        if step.owner is not None and ctx.attn_metadata is not step.owner:
            st.step = step = None  # MRv2: a forward with another dict (a dummy run) runs stock
        else:
            _inject(step, ctx, st, kwargs.get("positions", args[1] if len(args) > 1 else None))
            if not step.identity:  # visual tokens in the step (or no text token at all)
                ctx.skip_compiled = True
            elif st.compiles and not st.traced:
                # vLLM traces once, at the first compiled call (its warm-up, unless skipped, as
                # VLLM_CPU_CI_ENV does); a 1-token batch there would specialise the graph to one
                # token, so such a step stays eager until a larger one has been traced
                if step.num_text < 2:
                    ctx.skip_compiled = True
                else:
                    st.traced = True
            if st.compiles and not ctx.skip_compiled:
                st.compiled_steps += 1
            else:
                st.eager_steps += 1
            if st.deepstack is not None:
                _skip_deepstack(st)
    if step is None and st.withdrawn_buf is not None:
        st.withdrawn_buf.zero_()  # a dummy run withdraws nothing
    return orig(*args, **kwargs)


def _skip_deepstack(st: _State) -> None:
    """Zeroes the DeepStack levels >= K of this step (filled by the model's embed_input_ids, which
    the runner calls before the forward; the model clears them after it)."""
    m = st.deepstack
    n = getattr(m, "deepstack_input_embeds_num_tokens", None)
    if n == 0:  # no picture in this step: the buffers are zero
        return
    for b in m.deepstack_input_embeds[st.settings.layer:]:
        (b[:n] if n else b).zero_()


def _pass_through(st: _State, positions, hidden_states, residual, *args, **kwargs):
    """Decoder layers K+1..L-1: run by layer K's wrapper (:func:`_deep_forward`)."""
    return hidden_states, residual


def _deep_forward(st: _State, forwards, positions, hidden_states, residual, *args, **kwargs):
    """Decoder layer K: runs layers K..L-1 (their original forwards, in order)."""
    step = None if torch.compiler.is_compiling() else st.step
    if step is None or step.identity:
        # every token through the deep layers (a traced or compiled step, an identity step, a
        # dummy run): only the attention metadata differs from stock, and it is in the forward
        # context; a token withdrawn on the device leaves with the stream that entered layer K
        h0, r0 = hidden_states, residual
        for f in forwards:
            hidden_states, residual = f(positions, hidden_states, residual, *args, **kwargs)
        buf = st.withdrawn_buf
        if buf is not None:
            if r0 is None:  # K == 0: no residual stream yet
                r0 = torch.zeros_like(h0)
            w = buf[: hidden_states.shape[0]].unsqueeze(-1)
            hidden_states = torch.where(w, h0.to(hidden_states.dtype), hidden_states)
            residual = torch.where(w, r0.to(residual.dtype), residual)
        return hidden_states, residual
    if step.num_text == 0:  # no text token in the step: every token leaves with the early-exit value
        return hidden_states, (residual if residual is not None else torch.zeros_like(hidden_states))
    from vllm.forward_context import get_forward_context

    _inject(step, get_forward_context(), st, positions)
    full_h, full_r = hidden_states, residual
    keep = step.keep
    h = hidden_states.index_select(0, keep)
    r = residual.index_select(0, keep) if residual is not None else None
    pos = positions.index_select(-1, keep)  # [N] or M-RoPE's [3, N]
    for f in forwards:
        h, r = f(pos, h, r, *args, **kwargs)
    # back to the batch's [N, D] layout (withdrawn rows: the stream that entered layer K, which
    # the final norm turns into the early-exit value)
    if full_r is None:  # K == 0: no residual stream yet
        full_r = torch.zeros_like(full_h)
    h, r = h.to(full_h.dtype), r.to(full_r.dtype)
    if step.withdrawn is not None:
        w = step.withdrawn[:, None]
        h = torch.where(w, full_h.index_select(0, keep), h)
        r = torch.where(w, full_r.index_select(0, keep), r)
    return full_h.index_copy(0, keep, h), full_r.index_copy(0, keep, r)
