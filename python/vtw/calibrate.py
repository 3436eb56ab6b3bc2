"""`vtw.calibrate`: choose the withdrawal layer K (the paper's criterion, with a shared prefix),
or a criterion over the whole answer, and what each K saves.

**The paper's criterion** (``answer_tokens=0``, the default): for every candidate K, the mean
over samples of KL(P_withdrawn(K) || P_full) between the next-token distributions at each
sample's last input position (the last non-padding position, so left and right padding both
work), computed in float32; K is the smallest candidate whose mean is at or under the threshold.

**The answer criterion** (``answer_tokens=N > 0``): the full model first answers each sample
greedily (``generate`` with a neutral generation config: argmax at every step, the visual
placeholder tokens never chosen; up to N tokens, the answer ending after an end-of-sequence
token). A sample's score for K is then the mean, over the positions that predict its answer
tokens (the last input position, then each answer token but the last), of KL(P_withdrawn(K) ||
P_full), both teacher-forced on the full model's answer; ``kl[K]`` is the mean over samples (each
sample weighs the same, whatever its answer's length). Answers of different lengths share a
batch: every sample's prompt plus answer is left-padded again (``_pack_left``), so the scored
positions are each row's last ones. ``answer_tokens=1`` scores the first answer token only, which
is the paper's criterion.

**Cost.** The paper's reference code reruns the whole model once per candidate K. Layers
``0 .. K-1`` of a withdrawn forward see exactly what the full model's layers see, so here each
batch runs through the model once, without withdrawal (over prompt + answer with
``answer_tokens``), keeping the output of every decoder layer and the inputs of the language
model. Then, for each K, the language model is called again on those inputs with
``vtw.enable(model, K)`` in effect while layers ``0 .. K-1`` *replay* their recorded outputs
instead of computing: only layers ``K .. L-1`` run, on the text tokens only (prompt text and
answer), and the vision tower does not run again. Everything else (masks, rotary and M-RoPE
positions, padding) is ``vtw.enable``'s own wiring, so the result is the withdrawn model's, not
an imitation of it. Cost per batch: ``L`` layer evaluations over the full sequence plus
``sum(L - K)`` over the text tokens, against ``(1 + number of candidates) * L`` for the reference
way; with ``answer_tokens`` both add the greedy answers (one prefill and up to N - 1 cached
decode steps, ``L`` layer evaluations each).

**FLOPs.** ``flops_saved[K]`` is the fraction of the decoder prefill FLOPs of these samples'
prompts (each unpadded; VTW.md's ``4nd^2 + 2n^2d + 3ndm`` per layer, :mod:`vtw.costs`) that
withdrawal at K saves: total over the samples, ``1 - sum(FLOPs at K) / sum(FLOPs of the full
model)``. It counts the prompt's prefill in both criteria (the answer is decoded, not prefilled).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import costs as _costs
from .enable import disable as _disable
from .enable import enable as _enable_at
from . import models as _models

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        kl: candidate layer K -> mean over samples of KL(P_withdrawn(K) || P_full) (nats): at the
            last prompt position (``answer_tokens=0``), or each sample's mean over its answer's
            positions (``answer_tokens > 0``).
        layer: the smallest K with ``kl[K] <= threshold``, or None if there is none.
        threshold: the threshold used.
        num_layers: the number of decoder layers of the model.
        num_samples: how many samples the means are over.
        layer_evals: decoder-layer evaluations this calibration computed (a layer run once over a
            batch counts 1, a cached decode step too): ``L`` per batch for the full forward plus
            ``L - K`` per candidate K (those on the text tokens only), plus ``L`` per generation
            step of the greedy answers with ``answer_tokens``. Counted as the layers ran.
        layer_evals_reference: what the reference way costs: one full forward plus one forward
            per candidate, ``(1 + candidates) * L`` per batch (plus the same greedy answers).
        flops_saved: candidate layer K -> the fraction of the decoder prefill FLOPs of these
            samples' prompts that withdrawal at K saves (VTW.md's formula; empty when the model's
            config gives no hidden and MLP sizes).
        answer_tokens: the ``answer_tokens`` the calibration ran with (0: the paper's criterion).
        mean_answer_length: with ``answer_tokens``, the mean number of answer tokens (the
            end-of-sequence token included) of the full model's answers, i.e. of positions scored
            per sample; 0 otherwise.
    """

    kl: dict[int, float]
    layer: int | None
    threshold: float
    num_layers: int
    num_samples: int = 0
    layer_evals: int = 0
    layer_evals_reference: int = 0
    flops_saved: dict[int, float] = field(default_factory=dict)
    answer_tokens: int = 0
    mean_answer_length: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def saved_fraction(self) -> float:
        """Fraction of the reference way's layer evaluations this calibration did not need."""
        if not self.layer_evals_reference:
            return 0.0
        return 1.0 - self.layer_evals / self.layer_evals_reference

    @property
    def criterion(self) -> str:
        """What ``kl`` measures, in words."""
        if self.answer_tokens:
            return (f"mean KL(P_withdrawn(K) || P_full) over the full model's greedy answer (up to "
                    f"{self.answer_tokens} tokens)")
        return "mean KL(P_withdrawn(K) || P_full) at the last prompt position"

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "layer": self.layer,
            "num_layers": self.num_layers,
            "num_samples": self.num_samples,
            "answer_tokens": self.answer_tokens,
            "mean_answer_length": self.mean_answer_length,
            "kl": {str(k): v for k, v in sorted(self.kl.items())},
            "flops_saved": {str(k): v for k, v in sorted(self.flops_saved.items())},
            "layer_evals": self.layer_evals,
            "layer_evals_reference": self.layer_evals_reference,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        return cls(kl={int(k): float(v) for k, v in d["kl"].items()}, layer=d["layer"],
                   threshold=float(d["threshold"]), num_layers=int(d["num_layers"]),
                   num_samples=int(d.get("num_samples", 0)), layer_evals=int(d.get("layer_evals", 0)),
                   layer_evals_reference=int(d.get("layer_evals_reference", 0)),
                   flops_saved={int(k): float(v) for k, v in d.get("flops_saved", {}).items()},
                   answer_tokens=int(d.get("answer_tokens", 0)),
                   mean_answer_length=float(d.get("mean_answer_length", 0.0)), extra=dict(d.get("extra", {})))

    @classmethod
    def load(cls, path) -> Calibration:
        """Reads a JSON file written by :meth:`save` (or the folder holding ``calibration.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "calibration.json"
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, path) -> tuple[Path, Path]:
        """Writes the JSON file and the PNG plot (KL and FLOPs saved by layer); returns their paths.

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
        """The curve as text: one line per candidate layer (K, mean KL, FLOPs saved, a log-scale
        bar of the KL), then the chosen K and what it saves."""
        lines = [f"  {'K':>3}  {'mean KL':>11}  {'FLOPs saved':>11}  (log scale; | marks the threshold "
                 f"{self.threshold:g})"]
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
            saved = f"{self.flops_saved[k]:11.1%}" if k in self.flops_saved else f"{'-':>11}"
            lines.append(f"  {k:>3}  {v:11.3e}  {saved}  {''.join(bar)}{mark}")
        if self.layer is not None:
            chosen = f"K = {self.layer} (first layer with mean KL <= {self.threshold:g})"
            if self.layer in self.flops_saved:
                chosen += f": {self.flops_saved[self.layer]:.1%} of the decoder prefill FLOPs saved"
        else:
            chosen = f"no candidate layer has mean KL <= {self.threshold:g} (nothing withdrawn, nothing saved)"
        lines.append(f"  {chosen}")
        return "\n".join(lines)

    def cost_line(self) -> str:
        if self.answer_tokens:
            how = ("greedy answers, then one full forward over prompt + answer and text-only suffixes",
                   "the same answers, then one full forward per candidate")
        else:
            how = ("full forward + text-only suffixes", "one full forward per candidate")
        return (f"calibration cost: {self.layer_evals} decoder-layer evaluations ({how[0]}) instead of "
                f"{self.layer_evals_reference} ({how[1]}): {self.saved_fraction:.0%} saved")


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


KL_COLOR = (30, 70, 200)
FLOPS_COLOR = (230, 120, 20)
THRESHOLD_COLOR = (200, 30, 30)
LAYER_COLOR = (20, 140, 40)


def plot(cal: Calibration, size: tuple[int, int] = (720, 440)):
    """A PIL image of the mean KL by candidate layer (log scale, left axis) and, beside it, the
    fraction of decoder prefill FLOPs each K saves (linear, right axis), with the threshold as a
    dashed line and the chosen K marked, so the trade-off reads off one picture. KL values of
    exactly 0 sit on the bottom edge as hollow dots."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 80, W - 64, 58, H - 56
    title = ("vtw.calibrate: mean KL(P_withdrawn(K) || P_full) over the answer (up to "
             f"{cal.answer_tokens} tokens)" if cal.answer_tokens
             else "vtw.calibrate: mean KL(P_withdrawn(K) || P_full) at the last prompt position")
    d.text((left, 8), title, fill="black", font=font)
    # legend
    d.line([left, 32, left + 24, 32], fill=KL_COLOR, width=2)
    d.text((left + 30, 26), "mean KL (left axis, log scale)", fill=KL_COLOR, font=font)
    if cal.flops_saved:
        x0 = left + 260
        d.line([x0, 32, x0 + 24, 32], fill=FLOPS_COLOR, width=2)
        d.rectangle([x0 + 9, 29, x0 + 15, 35], fill=FLOPS_COLOR)
        d.text((x0 + 30, 26), "decoder prefill FLOPs saved (right axis)", fill=FLOPS_COLOR, font=font)
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

    def Yf(f):  # FLOPs saved, 0 .. 1
        return bottom - (bottom - top) * min(max(f, 0.0), 1.0)

    for e in range(int(lo), int(hi) + 1):  # decades
        y = Y(10.0 ** e)
        d.line([left, y, left - 5, y], fill="black")
        d.line([left + 1, y, right - 1, y], fill=(230, 230, 230))
        d.text((left - 50, y - 6), f"1e{e}", fill="black", font=font)
    if cal.flops_saved:
        for pct in range(0, 101, 20):
            y = Yf(pct / 100)
            d.line([right, y, right + 5, y], fill=FLOPS_COLOR)
            d.text((right + 9, y - 6), f"{pct}%", fill=FLOPS_COLOR, font=font)
    step = max(1, (kmax - kmin) // 16 + 1)
    for k in ks:
        if (k - ks[0]) % step == 0 or k == cal.layer:
            d.line([X(k), bottom, X(k), bottom + 5], fill="black")
            d.text((X(k) - 4, bottom + 8), str(k), fill="black", font=font)
    d.text(((left + right) // 2 - 60, H - 24), "candidate layer K (0-based)", fill="black", font=font)
    d.text((8, top - 24), "mean KL", fill="black", font=font)
    if cal.threshold > 0:  # dashed threshold line
        y = Y(cal.threshold)
        x = left
        while x < right:
            d.line([x, y, min(x + 8, right), y], fill=THRESHOLD_COLOR, width=2)
            x += 14
        d.text((left + 8, y - 16), f"threshold {cal.threshold:g}", fill=THRESHOLD_COLOR, font=font)
    if cal.layer is not None:
        x = X(cal.layer)
        d.line([x, top, x, bottom], fill=LAYER_COLOR, width=2)
        label = f"K = {cal.layer}"
        if cal.layer in cal.flops_saved:
            label += f": {cal.flops_saved[cal.layer]:.1%} saved"
        tx = x + 6 if x + 6 + 8 * len(label) < right else x - 6 - 6 * len(label)
        d.text((tx, top + 6), label, fill=LAYER_COLOR, font=font)
    d.rectangle([left, top, right, bottom], outline="black")
    fks = [k for k in ks if k in cal.flops_saved]
    fpts = [(X(k), Yf(cal.flops_saved[k])) for k in fks]
    if len(fpts) > 1:
        d.line(fpts, fill=FLOPS_COLOR, width=2)
    for x, y in fpts:
        d.rectangle([x - 3, y - 3, x + 3, y + 3], fill=FLOPS_COLOR)
    pts = [(X(k), Y(cal.kl[k])) for k in ks]
    if len(pts) > 1:
        d.line(pts, fill=KL_COLOR, width=2)
    for k, (x, y) in zip(ks, pts):
        r = 4
        zero = not (cal.kl[k] > 0)
        d.ellipse([x - r, y - r, x + r, y + r], outline=KL_COLOR, fill=None if zero else KL_COLOR)
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


def _check_answer_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"vtw.calibrate: answer_tokens must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"vtw.calibrate: answer_tokens must be >= 0 (0: the paper's criterion), got {n}")
    return n


def _as_ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int):
        return [v]
    return [int(x) for x in v]


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    try:
        return get(decoder=True) if get is not None else cfg
    except (TypeError, ValueError):
        return cfg


def _flops_dims(model) -> tuple[int, int] | None:
    """(hidden d, MLP width m) of the language model, for VTW.md's FLOPs formula; None if unknown."""
    tc = _text_config(model)
    d, m = getattr(tc, "hidden_size", None), getattr(tc, "intermediate_size", None)
    if isinstance(d, int) and isinstance(m, int) and d > 0 and m > 0:
        return d, m
    return None


def _special_ids(model) -> tuple[list[int], int]:
    """The end-of-sequence ids the greedy answers stop after, and a padding id."""
    gc = getattr(model, "generation_config", None)
    tc = _text_config(model)
    eos = _as_ids(getattr(gc, "eos_token_id", None)) or _as_ids(getattr(tc, "eos_token_id", None)) \
        or _as_ids(getattr(model.config, "eos_token_id", None))
    pad = next((v for v in (getattr(gc, "pad_token_id", None), getattr(tc, "pad_token_id", None),
                            getattr(model.config, "pad_token_id", None)) if isinstance(v, int)), None)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, pad


#: 2-D integer inputs that are not per token even when their shape happens to be [B, S].
_NOT_PER_TOKEN = {"image_sizes", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "pixel_attention_mask"}


def _pack_left(inputs: dict, valid: torch.Tensor, appended: list[list[int]], pad_id: int) -> dict:
    """The batch with `appended[b]` (text token ids) after sample b's last input token, every row
    left-padded again (also when the batch came right-padded): the inputs of the teacher-forced
    pass, whose row b ends with its last appended token. Per-token inputs other than input_ids
    and attention_mask (token_type_ids, mm_token_type_ids, ...: 2-D integer tensors of the batch's
    [B, S]) move with their tokens and are 0 for the appended (text) tokens."""
    B, S = valid.shape
    device = valid.device
    lens = [int(valid[b].sum()) + len(appended[b]) for b in range(B)]
    S2 = max(lens)
    out = dict(inputs)
    per_token = {"input_ids": inputs["input_ids"],
                 "attention_mask": inputs.get("attention_mask", torch.ones(B, S, dtype=torch.long, device=device))}
    for name, t in inputs.items():
        if (name not in per_token and name not in _NOT_PER_TOKEN and isinstance(t, torch.Tensor) and t.ndim == 2
                and tuple(t.shape) == (B, S) and not t.is_floating_point()):
            per_token[name] = t
    for name, t in per_token.items():
        fill = pad_id if name == "input_ids" else 0
        new = torch.full((B, S2), fill, dtype=t.dtype, device=device)
        for b in range(B):
            if name == "input_ids":
                ext = torch.tensor(appended[b], dtype=t.dtype, device=device)
            else:
                ext = torch.full((len(appended[b]),), 1 if name == "attention_mask" else 0, dtype=t.dtype,
                                 device=device)
            new[b, S2 - lens[b]:] = torch.cat([t[b][valid[b]], ext])
        out[name] = new
    return out


def _greedy_answers(model, inputs: dict, n: int, suppress: list[int], eos: list[int], pad_id: int) -> list[list[int]]:
    """The full model's greedy answer to each row of a left-padded batch: up to `n` tokens, each
    answer ending after its first end-of-sequence token. `generate` runs with a neutral generation
    config (the model's own may sample or penalise repetitions): argmax at every step, `suppress`
    (the visual placeholder ids) never chosen."""
    from transformers import GenerationConfig

    if not (hasattr(model, "generate") and (not hasattr(model, "can_generate") or model.can_generate())):
        raise TypeError(f"vtw.calibrate: answer_tokens needs a model that can generate; {type(model).__name__} "
                        "cannot")
    own = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos or None, pad_token_id=pad_id,
                                               bos_token_id=getattr(own, "bos_token_id", None))
    try:
        S = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=0, do_sample=False, num_beams=1,
                             suppress_tokens=suppress or None, use_cache=True, return_dict_in_generate=False)
    finally:
        model.generation_config = own
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    stop = set(eos)
    answers = []
    for row in seqs[:, S:].tolist():
        ans = []
        for t in row[:n]:
            ans.append(t)
            if t in stop:
                break
        answers.append(ans)
    return answers


@torch.no_grad()
def calibrate(model, batches, *, threshold: float = 0.003, layers=None, progress: bool = True,
              answer_tokens: int = 0) -> Calibration:
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
        answer_tokens: 0 (default): the paper's criterion, the next-token distribution at the last
            prompt position. N > 0: the full model answers each sample greedily (up to N tokens,
            ending after an end-of-sequence token) and the KL is averaged over the positions that
            predict the answer, teacher-forced on it (for captioning, chat, multi-token answers).

    Returns a :class:`Calibration` (``kl``, ``layer``, ``flops_saved``, ...). The model is left
    exactly as it was (a model on which ``vtw.enable`` was in effect is enabled again as it was),
    also when an error is raised.
    """
    threshold = _check_threshold(threshold)
    answer_tokens = _check_answer_tokens(answer_tokens)
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
        total = len(batches) * (1 + len(ks) + (1 if answer_tokens else 0))
    except TypeError:
        total = None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    eos, pad_id = _special_ids(model)
    dims = _flops_dims(model)

    prior = _prior_state(wiring)
    if prior is not None:
        _disable(model)
    kl_sum = {k: 0.0 for k in ks}
    n_samples = 0
    answer_len_sum = 0
    counts = []  # (tokens, text tokens) of each sample's prompt, for the FLOPs
    counter = {"computed": 0}
    bar = _progress(total, progress)
    hooks = []
    try:
        for layer in wiring.layers:
            hooks.append(layer.register_forward_pre_hook(_count_hook(counter)))
        evals = 0
        gen_evals = 0
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
            token_ids = torch.tensor(wiring.token_ids, device=device)
            visual = torch.isin(ids, token_ids)
            rows = torch.arange(B, device=device)
            if bool(visual[rows, last].any()):
                b = int(visual[rows, last].nonzero()[0, 0])
                raise ValueError(f"vtw.calibrate: sample {b} of batch {bi} ends with a visual token; the next-token "
                                 "distribution is read at the last prompt position, which must be text")
            am = inputs.get("attention_mask")
            valid = (am != 0) if am is not None else torch.ones(B, S, dtype=torch.bool, device=device)
            n_tok = valid.sum(1).tolist()
            n_vis = (visual & valid).sum(1).tolist()
            counts += [(a, a - v) for a, v in zip(n_tok, n_vis)]
            if answer_tokens:
                if "position_ids" in inputs or "cache_position" in inputs:
                    raise ValueError(f"vtw.calibrate: batch {bi} gives position_ids/cache_position; with "
                                     "answer_tokens the model must compute them (leave them out)")
                counter["computed"] = 0
                answers = _greedy_answers(model, _pack_left(inputs, valid, [[] for _ in range(B)], pad_id),
                                          answer_tokens, list(wiring.token_ids), eos, pad_id)
                gen_evals += counter["computed"]
                evals += counter["computed"]
                if bar is not None:
                    bar.update(1)
                inputs = _pack_left(inputs, valid, [a[:-1] for a in answers], pad_id)
                ids = inputs["input_ids"]
                visual = torch.isin(ids, token_ids)
                # row b's scored positions are its last len(answer) ones: the last prompt token, then
                # every answer token but the last
                n = torch.tensor([len(a) for a in answers], device=device)
                S2 = ids.shape[1]
                j = torch.arange(int(n.max()), device=device)
                pos = (S2 - n[:, None] + j).clamp(max=S2 - 1)
                weight = (j < n[:, None]).double() / n[:, None].double()
                answer_len_sum += int(n.sum())
            else:
                pos = last[:, None]
                weight = torch.ones(B, 1, dtype=torch.float64, device=device)
            counter["computed"] = 0
            text_call, outputs, full_last = _full_forward(model, wiring, inputs, max(ks))
            evals += counter["computed"]
            logp_full = torch.log_softmax(head(full_last[rows[:, None], pos]).float(), dim=-1)
            if bar is not None:
                bar.update(1)
            for k in ks:
                counter["computed"] = 0
                hidden = _withdrawn_forward(model, wiring, k, text_call, outputs, visual, counter)
                evals += counter["computed"]
                logp = torch.log_softmax(head(hidden[rows[:, None], pos]).float(), dim=-1)
                kl = (logp.exp() * (logp - logp_full)).sum(-1)  # [B, positions]
                kl_sum[k] += float((kl.double() * weight).sum())
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
    flops = {k: _costs.prefill_flops_saved(counts, dims[0], dims[1], L, k) for k in ks} if dims else {}
    return Calibration(kl=kl, layer=chosen, threshold=threshold, num_layers=L, num_samples=n_samples,
                       layer_evals=evals, layer_evals_reference=gen_evals + n_batches * (1 + len(ks)) * L,
                       flops_saved=flops, answer_tokens=answer_tokens,
                       mean_answer_length=answer_len_sum / n_samples if answer_tokens else 0.0)


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
