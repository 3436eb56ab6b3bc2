"""vtw.enable makes no host synchronisation inside the decoder-layer loop (from the first decoder
layer's call to the return of the last one's): neither in a prefill (rows that keep as many
tokens, and ragged left-padded rows) nor in decode steps, with DynamicCache and StaticCache.

On CPU, a TorchDispatchMode records, while the layers run, every aten op that reads tensor data
back to the host (`.item()`, `bool(t)`, `int(t)`: `_local_scalar_dense` / `is_nonzero`) or whose
output size depends on the data (`nonzero`, `masked_select`, boolean indexing, `unique`, ...),
which are the ops that synchronise with a GPU. On a GPU (marked `gpu`), CUDA's own detector
(`torch.cuda.set_sync_debug_mode("error")`) is switched on for the same span."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtw
from test_enable_support import one_thread  # noqa: F401  (fixture: one intra-op thread)
from test_enable_support import batch_inputs, gen_kwargs, llava_case

aten = torch.ops.aten
_SYNCING = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.masked_select, aten.equal,
            aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave, aten.allclose}


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    return isinstance(idx, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx)


class _Recorder(TorchDispatchMode):
    """Records syncing ops run while `inside` is set (by hooks on the first and last decoder layers)."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            pkt = func.overloadpacket
            if pkt in _SYNCING or (pkt in (aten.index, aten.index_put, aten.index_put_) and _bool_index(args)):
                if not (pkt is aten.repeat_interleave and (kwargs or {}).get("output_size") is not None):
                    self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def _span_hooks(layers, on_enter, on_exit):
    return [layers[0].register_forward_pre_hook(lambda m, a: on_enter()),
            layers[-1].register_forward_hook(lambda m, a, o: on_exit())]


@pytest.fixture(scope="module")
def case():
    return llava_case("sdpa", layers=4)


def _run(case, inputs, K, **gen):
    vtw.enable(case.model, K)
    try:
        with torch.no_grad():
            case.model(**inputs)  # prefill only
            return case.model.generate(**inputs, **gen_kwargs(case, 3, **gen))
    finally:
        vtw.disable(case.model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", ["ragged", "equal"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_no_sync_inside_the_layers_cpu(case, attn, rows, cache):
    case.model.set_attn_implementation(attn)
    samples = case.samples if rows == "ragged" else [case.samples[0], case.samples[0]]
    inputs = batch_inputs(case, samples)
    text = case.model.model.language_model
    rec = _Recorder()
    seen = []

    def enter():
        rec.inside = True
        seen.append(1)

    def leave():
        rec.inside = False

    hooks = _span_hooks(text.layers, enter, leave)
    try:
        with rec:
            _run(case, inputs, 2, **({"cache_implementation": "static"} if cache == "static" else {}))
    finally:
        for h in hooks:
            h.remove()
        case.model.set_attn_implementation("sdpa")
    assert len(seen) == 1 + 3  # the recorder watched the prefill and the generate's 3 forwards
    assert rec.found == [], f"syncing ops inside the decoder layers: {sorted(set(rec.found))}"


def test_recorder_sees_a_sync():
    # The recorder is not blind: bool() of a tensor inside the span is caught.
    rec = _Recorder()
    with rec:
        rec.inside = True
        x = torch.ones(3)
        if (x > 0).all():
            pass
        int(x.sum())
        x[x > 0]
    assert any("is_nonzero" in f or "_local_scalar_dense" in f for f in rec.found)
    assert any("index" in f for f in rec.found)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", ["ragged", "equal"])
def test_no_sync_inside_the_layers_cuda(rows):
    c = llava_case("sdpa", layers=4)
    c.model.to("cuda")
    samples = c.samples if rows == "ragged" else [c.samples[0], c.samples[0]]
    inputs = {k: v.to("cuda") for k, v in batch_inputs(c, samples).items()}
    text = c.model.model.language_model
    hooks = _span_hooks(text.layers, lambda: torch.cuda.set_sync_debug_mode("error"),
                        lambda: torch.cuda.set_sync_debug_mode("default"))
    try:
        _run(c, inputs, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for h in hooks:
            h.remove()
