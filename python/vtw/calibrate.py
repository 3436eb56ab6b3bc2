"""`vtw.calibrate`: choose the withdrawal layer K (the paper's criterion, with a shared prefix).

For every candidate K, the criterion is the mean over samples of KL(P_withdrawn(K) || P_full)
between the next-token distributions at each sample's last input position (the last non-padding
position, so left and right padding both work), computed in float32; K is the smallest candidate
whose mean is at or under the threshold.

The paper's reference code reruns the whole model once per candidate K. Layers ``0 .. K-1`` of
a withdrawn forward see exactly what the full model's layers see, so here each batch runs
through the model once, without withdrawal, keeping the output of every decoder layer and the
inputs of the language model. Then, for each K, the language model is called again on those
inputs with ``vtw.enable(model, K)`` in effect while layers ``0 .. K-1`` *replay* their recorded
outputs instead of computing: only layers ``K .. L-1`` run, on the text tokens only, and the
vision tower does not run again. Everything else (masks, rotary and M-RoPE positions, padding)
is ``vtw.enable``'s own wiring, so the result is the withdrawn model's, not an imitation of it.
Cost per batch: ``L`` layer evaluations over the full sequence plus ``sum(L - K)`` over the text
tokens, against ``(1 + number of candidates) * L`` for the reference way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .enable import disable as _disable
from .enable import enable as _enable_at
from . import models as _models

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        kl: candidate layer K -> mean over samples of KL(P_withdrawn(K) || P_full) (nats).
        layer: the smallest K with ``kl[K] <= threshold``, or None if there is none.
        threshold: the threshold used.
        num_layers: the number of decoder layers of the model.
        num_samples: how many samples the means are over.
        layer_evals: decoder-layer evaluations this calibration computed (a layer run once over a
            batch counts 1): ``L`` per batch for the full forward plus ``L - K`` per candidate K
            (those on the text tokens only). Counted as the layers ran.
        layer_evals_reference: what the reference way costs: one full forward plus one forward
            per candidate, ``(1 + candidates) * L`` per batch.
    """

    kl: dict[int, float]
    layer: int | None
    threshold: float
    num_layers: int
    num_samples: int = 0
    layer_evals: int = 0
    layer_evals_reference: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def saved_fraction(self) -> float:
        """Fraction of the reference way's layer evaluations this calibration did not need."""
        if not self.layer_evals_reference:
            return 0.0
        return 1.0 - self.layer_evals / self.layer_evals_reference

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "layer": self.layer,
            "num_layers": self.num_layers,
            "num_samples": self.num_samples,
            "kl": {str(k): v for k, v in sorted(self.kl.items())},
            "layer_evals": self.layer_evals,
            "layer_evals_reference": self.layer_evals_reference,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        return cls(kl={int(k): float(v) for k, v in d["kl"].items()}, layer=d["layer"],
                   threshold=float(d["threshold"]), num_layers=int(d["num_layers"]),
                   num_samples=int(d.get("num_samples", 0)), layer_evals=int(d.get("layer_evals", 0)),
                   layer_evals_reference=int(d.get("layer_evals_reference", 0)), extra=dict(d.get("extra", {})))

    @classmethod
    def load(cls, path) -> Calibration:
        """Reads a JSON file written by :meth:`save` (or the folder holding ``calibration.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "calibration.json"
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, path) -> tuple[Path, Path]:
        """Writes the JSON file and the PNG plot of KL by layer; returns their paths.

        `path` is a folder (then ``calibration.json`` and ``calibration.png`` in it, created if
        needed) or a file name ending in ``.json`` (then the plot is the same name with ``.png``)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            json_path, png_path = path, path.with_suffix(".png")
            json_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            path.mkdir(parents=True, exist_ok=True)
            json_path, png_path = path / "calibration.json", path / "calibration.png"
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot(self).save(png_path, format="PNG")
        return json_path, png_path

    def table(self, width: int = 40) -> str:
        """The KL curve as text: one line per candidate layer, a log-scale bar, the threshold and K."""
        lines = [f"  {'K':>3}  {'mean KL':>11}  (log scale; | marks the threshold {self.threshold:g})"]
        ks = sorted(self.kl)
        lo, hi = _log_range(self)
        tick = _bar_pos(self.threshold, lo, hi, width) if self.threshold > 0 else None
        for k in ks:
            v = self.kl[k]
            n = _bar_pos(v, lo, hi, width) if v > 0 and math.isfinite(v) else 0
            bar = list("#" * n + " " * (width - n))
            if tick is not None and 0 <= tick < width:
                bar[tick] = "|"
            mark = "  <- K" if k == self.layer else ""
            lines.append(f"  {k:>3}  {v:11.3e}  {''.join(bar)}{mark}")
        chosen = (f"K = {self.layer} (first layer with mean KL <= {self.threshold:g})" if self.layer is not None
                  else f"no candidate layer has mean KL <= {self.threshold:g}")
        lines.append(f"  {chosen}")
        return "\n".join(lines)

    def cost_line(self) -> str:
        return (f"calibration cost: {self.layer_evals} decoder-layer evaluations (full forward + text-only "
                f"suffixes) instead of {self.layer_evals_reference} (one full forward per candidate): "
                f"{self.saved_fraction:.0%} saved")


# --------------------------------------------------------------------------------------------
# The plot (Pillow only)


def _log_range(cal: Calibration) -> tuple[float, float]:
    vals = [v for v in cal.kl.values() if v > 0 and math.isfinite(v)]
    if cal.threshold > 0:
        vals.append(cal.threshold)
    if not vals:
        return -8.0, 0.0
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    if hi <= lo:
        hi = lo + 1
    return float(lo), float(hi)


def _bar_pos(v: float, lo: float, hi: float, width: int) -> int:
    x = (math.log10(v) - lo) / (hi - lo)
    return max(0, min(width - 1, int(round(x * (width - 1)))))


def plot(cal: Calibration, size: tuple[int, int] = (720, 440)):
    """A PIL image of the mean KL by candidate layer (log scale), with the threshold as a dashed
    line and the chosen K marked. Values of exactly 0 sit on the bottom edge as hollow dots."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 80, W - 24, 44, H - 56
    d.text((left, 12), "vtw.calibrate: mean KL(P_withdrawn(K) || P_full) at the last prompt position",
           fill="black", font=font)
    d.rectangle([left, top, right, bottom], outline="black")
    ks = sorted(cal.kl)
    lo, hi = _log_range(cal)
    kmin, kmax = (ks[0], ks[-1]) if ks else (0, 1)
    if kmax == kmin:
        kmin, kmax = kmin - 1, kmax + 1

    def X(k):
        return left + 10 + (right - left - 20) * (k - kmin) / (kmax - kmin)

    def Y(v):
        if v <= 0 or not math.isfinite(v):
            return bottom
        return bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)

    for e in range(int(lo), int(hi) + 1):  # decades
        y = Y(10.0 ** e)
        d.line([left, y, left - 5, y], fill="black")
        d.line([left + 1, y, right - 1, y], fill=(230, 230, 230))
        d.text((left - 50, y - 6), f"1e{e}", fill="black", font=font)
    step = max(1, (kmax - kmin) // 16 + 1)
    for k in ks:
        if (k - ks[0]) % step == 0 or k == cal.layer:
            d.line([X(k), bottom, X(k), bottom + 5], fill="black")
            d.text((X(k) - 4, bottom + 8), str(k), fill="black", font=font)
    d.text(((left + right) // 2 - 60, H - 24), "candidate layer K (0-based)", fill="black", font=font)
    d.text((8, top - 16), "mean KL", fill="black", font=font)
    if cal.threshold > 0:  # dashed threshold line
        y = Y(cal.threshold)
        x = left
        while x < right:
            d.line([x, y, min(x + 8, right), y], fill=(200, 30, 30), width=2)
            x += 14
        d.text((right - 150, y - 16), f"threshold {cal.threshold:g}", fill=(200, 30, 30), font=font)
    if cal.layer is not None:
        x = X(cal.layer)
        d.line([x, top, x, bottom], fill=(20, 140, 40), width=2)
        d.text((x + 6, top + 6), f"K = {cal.layer}", fill=(20, 140, 40), font=font)
    d.rectangle([left, top, right, bottom], outline="black")
    pts = [(X(k), Y(cal.kl[k])) for k in ks]
    if len(pts) > 1:
        d.line(pts, fill=(30, 70, 200), width=2)
    for k, (x, y) in zip(ks, pts):
        r = 4
        zero = not (cal.kl[k] > 0)
        d.ellipse([x - r, y - r, x + r, y + r], outline=(30, 70, 200), fill=None if zero else (30, 70, 200))
    return img


# --------------------------------------------------------------------------------------------
# The calibration


def _check_layers(layers, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"vtw.calibrate: layers must be an iterable of ints, got {type(layers).__name__}")
    out = set()
    for k in layers:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"vtw.calibrate: layers must hold ints, got {type(k).__name__} ({k!r})")
        if not 0 <= k <= num_layers:
            raise ValueError(f"vtw.calibrate: every layer must be in [0, {num_layers}] (the model has {num_layers} "
                             f"decoder layers), got {k}")
        out.add(k)
    if not out:
        raise ValueError("vtw.calibrate: layers is empty; give at least one candidate layer")
    return sorted(out)


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"vtw.calibrate: threshold must be a number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"vtw.calibrate: threshold must be a finite number >= 0, got {threshold}")
    return threshold


def _last_positions(inputs: dict, B: int, S: int, device) -> torch.Tensor:
    am = inputs.get("attention_mask")
    if am is None:
        return torch.full((B,), S - 1, dtype=torch.long, device=device)
    if not isinstance(am, torch.Tensor) or am.ndim != 2 or tuple(am.shape) != (B, S):
        raise ValueError(f"vtw.calibrate: attention_mask must be the [B, S] = [{B}, {S}] padding mask, got "
                         f"{tuple(am.shape) if isinstance(am, torch.Tensor) else type(am).__name__}")
    valid = am.to(device) != 0
    if not bool(valid.any(1).all()):
        raise ValueError("vtw.calibrate: a sample of the batch has no token (its attention_mask is all 0)")
    idx = torch.arange(S, device=device).expand(B, S)
    return torch.where(valid, idx, -1).max(1).values


def _prior_state(wiring):
    st = getattr(wiring.text_model, "_vtw_state", None)
    return None if st is None else (st.layer, st.mode, st.visual_mask)


@torch.no_grad()
def calibrate(model, batches, *, threshold: float = 0.003, layers=None, progress: bool = True) -> Calibration:
    """Chooses the withdrawal layer K of `model` on `batches` (see the module docstring).

    Args:
        model: a Hugging Face multimodal model with a language-modelling head
            (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ...).
        batches: an iterable of model input dicts, as a processor returns them (``input_ids``,
            ``attention_mask``, ``pixel_values``, ...); tensors are moved to the model's device.
            Each sample's last non-padding token must be a text token (a prompt ends with text).
        threshold: K is the smallest candidate whose mean KL is ``<= threshold`` (default 0.003,
            the paper's value for LLaVA-1.5-7B).
        layers: the candidate layers (ints in ``[0, L]``; default every decoder layer ``0 .. L-1``).
        progress: show a tqdm progress bar.

    Returns a :class:`Calibration`. The model is left exactly as it was (a model on which
    ``vtw.enable`` was in effect is enabled again as it was), also when an error is raised.
    """
    threshold = _check_threshold(threshold)
    wiring = _models.resolve(model)
    L = len(wiring.layers)
    ks = _check_layers(layers, L)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"vtw.calibrate: {type(model).__name__} has no language-modelling head "
                        "(get_output_embeddings()); give the ...ForConditionalGeneration model")
    if not wiring.token_ids:
        raise ValueError(f"vtw.calibrate: {type(model).__name__} has no image/video token id in its config, so the "
                         "visual tokens cannot be found")
    if isinstance(batches, Mapping):
        raise TypeError("vtw.calibrate: batches must be an iterable of input dicts (a list of batches), got one "
                        "dict; wrap it in a list")
    try:
        total = len(batches) * (1 + len(ks))
    except TypeError:
        total = None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    prior = _prior_state(wiring)
    if prior is not None:
        _disable(model)
    kl_sum = {k: 0.0 for k in ks}
    n_samples = 0
    counter = {"computed": 0}
    bar = _progress(total, progress)
    hooks = []
    try:
        for layer in wiring.layers:
            hooks.append(layer.register_forward_pre_hook(_count_hook(counter)))
        evals = 0
        n_batches = 0
        for bi, batch in enumerate(batches):
            if not isinstance(batch, Mapping) and not hasattr(batch, "keys"):
                raise TypeError(f"vtw.calibrate: batch {bi} must be a dict of model inputs, got {type(batch).__name__}")
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}
            ids = inputs.get("input_ids")
            if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
                raise ValueError(f"vtw.calibrate: batch {bi} needs input_ids, a [B, S] tensor (the visual tokens are "
                                 "found from the image/video token ids)")
            B, S = ids.shape
            if B == 0:
                continue
            last = _last_positions(inputs, B, S, device)
            visual = torch.isin(ids, torch.tensor(wiring.token_ids, device=device))
            rows = torch.arange(B, device=device)
            if bool(visual[rows, last].any()):
                b = int(visual[rows, last].nonzero()[0, 0])
                raise ValueError(f"vtw.calibrate: sample {b} of batch {bi} ends with a visual token; the next-token "
                                 "distribution is read at the last prompt position, which must be text")
            counter["computed"] = 0
            text_call, outputs, full_last = _full_forward(model, wiring, inputs, max(ks))
            evals += counter["computed"]
            logp_full = torch.log_softmax(head(full_last[rows, last]).float(), dim=-1)
            if bar is not None:
                bar.update(1)
            for k in ks:
                counter["computed"] = 0
                hidden = _withdrawn_forward(model, wiring, k, text_call, outputs, visual, counter)
                evals += counter["computed"]
                logp = torch.log_softmax(head(hidden[rows, last]).float(), dim=-1)
                kl = (logp.exp() * (logp - logp_full)).sum(-1)
                kl_sum[k] += float(kl.double().sum())
                if bar is not None:
                    bar.update(1)
            n_samples += B
            n_batches += 1
            del text_call, outputs
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
        _disable(model)
        if prior is not None:
            _enable_at(model, prior[0], mode=prior[1], visual_mask=prior[2])
    if n_samples == 0:
        raise ValueError("vtw.calibrate: batches is empty (no sample to calibrate on)")
    kl = {k: kl_sum[k] / n_samples for k in ks}
    chosen = next((k for k in ks if kl[k] <= threshold), None)
    return Calibration(kl=kl, layer=chosen, threshold=threshold, num_layers=L, num_samples=n_samples,
                       layer_evals=evals, layer_evals_reference=n_batches * (1 + len(ks)) * L)


def _progress(total, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    return tqdm(total=total, desc="vtw.calibrate", unit="forward", leave=False)


def _count_hook(counter):
    def hook(module, args):
        counter["computed"] += 1

    return hook


def _full_forward(model, wiring, inputs, keep_upto: int):
    """The unmodified model on one batch: returns the language model's call (args, kwargs), the
    outputs of decoder layers 0 .. keep_upto-1, and the language model's last hidden state."""
    call = {}
    outputs = {}

    def grab_call(module, args, kwargs):
        if "args" not in call:
            call["args"], call["kwargs"] = args, dict(kwargs)

    def grab_out(i):
        def hook(module, args, output):
            outputs[i] = output

        return hook

    def grab_last(module, args, kwargs, output):
        call["last"] = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state

    hs = [wiring.text_model.register_forward_pre_hook(grab_call, with_kwargs=True),
          wiring.text_model.register_forward_hook(grab_last, with_kwargs=True)]
    hs += [layer.register_forward_hook(grab_out(i)) for i, layer in enumerate(wiring.layers) if i < keep_upto]
    try:
        kw = dict(inputs)
        kw["use_cache"] = False
        model(**kw)
    finally:
        for h in hs:
            h.remove()
    if "args" not in call or "last" not in call:
        raise RuntimeError(f"vtw.calibrate: the forward of {type(model).__name__} did not call its language model "
                           f"{type(wiring.text_model).__name__}")
    for i in range(keep_upto):
        if not isinstance(outputs.get(i), torch.Tensor):
            raise TypeError(f"vtw.calibrate: decoder layer {i} returned {type(outputs.get(i)).__name__}; vtw needs "
                            "layers that return the hidden states as a tensor (transformers 5.x)")
    return call, outputs, call["last"]


def _withdrawn_forward(model, wiring, k: int, call, outputs, visual, counter):
    """The language model with withdrawal at layer k on the recorded inputs, layers < k replaying
    their recorded outputs; returns its last hidden state [B, S, D]."""
    _enable_at(model, k, visual_mask=lambda _inputs: visual)
    saved = {}
    try:
        for i in range(k):
            layer = wiring.layers[i]
            saved[i] = layer.__dict__.get("forward")
            layer.forward = _replay(outputs[i], counter)
        out = wiring.text_model(*call["args"], **call["kwargs"])
    finally:
        for i, fwd in saved.items():
            layer = wiring.layers[i]
            if fwd is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd
        _disable(model)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _replay(recorded, counter):
    def forward(*args, **kwargs):
        counter["computed"] -= 1  # the counting pre-hook fired, but this layer computes nothing
        return recorded

    return forward
