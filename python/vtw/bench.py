"""`python -m vtw bench`: end-to-end benchmarks of withdrawal on LLaVA-1.5-shaped models.

What users care about, measured with and without ``vtw.enable(model, K)`` on a
``LlavaForConditionalGeneration`` with random weights built from a config (no download):

- **prefill**: time to first token (one forward of the whole prompt, vision tower included, with
  a cache, then the argmax of the last position), the median over repeats after warm-up;
- **decode**: tokens per second over ``new_tokens`` greedy steps (the model's forward with its
  cache, one token per row and step; the image token id is never picked, so every generated
  token is text), timed after the prefill;
- **KV cache**: the bytes of every layer's keys and values after the prefill and after the last
  decode step (caches only grow, so that is their peak), and the deep layers' (``>= K``) share;
  on CUDA also the peak memory allocated over the weights.

Full and withdrawn calls alternate (the order rotates every round), so a change of machine load
during a run cannot decide a comparison; the paired ratio (median over rounds of full / withdrawn
of the same round) is reported beside the ratio of the medians.

Ideal speedups (:func:`ideal`): VTW.md's FLOPs formula for the decoder layers (per layer, n
tokens, hidden d, MLP width m: ``4nd^2 + 2n^2d + 3ndm``, counted in multiply-adds; exact for
LLaVA-1.5's multi-head attention), and the end-to-end one that also counts what withdrawal does
not reduce: the vision tower (all its layers run, as in Hugging Face's LLaVA), the projector and
the language-model head on the last position. Decode has a bytes model instead
(:func:`decode_ideal`): one step reads the decoder and head weights once and every layer's
cache once.

Presets (:data:`PRESETS`): ``tiny`` (tests), ``small`` (CPU: 8 layers, hidden 512, 576 image
tokens per image from a 4-layer CLIP at 336 px / patch 14), ``llava-1.5-7b`` and
``llava-1.5-13b`` (the real shapes: CLIP ViT-L/14 at 336 px, 24 layers; Vicuna 7B / 13B;
bfloat16, for a GPU).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .compat import transformers as _tf
from .costs import fmt_bytes, kv_bytes, prefill_flops, sync  # prefill_flops: VTW.md's formula
from .enable import disable, enable

__all__ = ["PRESETS", "Preset", "build_model", "make_inputs", "decoder_flops", "vision_flops", "head_flops",
           "ideal", "decode_ideal", "kv_bytes", "run_bench", "plot_sweep", "BenchConfig", "BenchError"]

SYSTEM_TOKENS = 35  # LLaVA-1.5's system prompt (VTW.md: 35 system + 576 image + 60 text)
TEXT_TOKENS = 60


class BenchError(Exception):
    """A problem with the benchmark's arguments or machine, reported as one line."""


# --------------------------------------------------------------------------------------------
# Presets and models


@dataclass(frozen=True)
class Preset:
    """A LLaVA-1.5 shape: Llama decoder + CLIP vision tower + 2-layer GELU projector."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    image_token_id: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    image_size: int
    patch_size: int
    dtype: str  # default dtype
    device: str  # the device it is meant for
    about: str = ""

    @property
    def image_tokens(self) -> int:
        """Image tokens per image: the patches (the CLS token is dropped by the 'default' strategy)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("tiny", layers=4, hidden=64, intermediate=172, heads=4, kv_heads=4, vocab=512, image_token_id=500,
               vision_layers=1, vision_hidden=32, vision_intermediate=64, vision_heads=2, image_size=56, patch_size=14,
               dtype="float32", device="cpu", about="for tests: 16 image tokens, a few ms per forward"),
        Preset("small", layers=8, hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=32064,
               image_token_id=32000, vision_layers=4, vision_hidden=128, vision_intermediate=512, vision_heads=2,
               image_size=336, patch_size=14, dtype="float32", device="cpu",
               about="the CPU shape: LLaVA-1.5's prompt layout (576 image tokens) on an 8-layer decoder"),
        Preset("llava-1.5-7b", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32064,
               image_token_id=32000, vision_layers=24, vision_hidden=1024, vision_intermediate=4096, vision_heads=16,
               image_size=336, patch_size=14, dtype="bfloat16", device="cuda",
               about="LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B"),
        Preset("llava-1.5-13b", layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32064,
               image_token_id=32000, vision_layers=24, vision_hidden=1024, vision_intermediate=4096, vision_heads=16,
               image_size=336, patch_size=14, dtype="bfloat16", device="cuda",
               about="LLaVA-1.5-13B: CLIP ViT-L/14-336 + Vicuna-13B"),
    )
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def llava_config(p: Preset):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                          num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                          image_size=p.image_size, patch_size=p.patch_size, projection_dim=p.hidden,
                          hidden_act="quick_gelu")
    tc = LlamaConfig(hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
                     num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, vocab_size=p.vocab,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=p.image_token_id,
                       image_seq_length=p.image_tokens, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_model(p: Preset, device="cpu", dtype=torch.float32, attn: str = "sdpa", seed: int = 0):
    """A ``LlavaForConditionalGeneration`` of preset `p` with random weights, built directly on
    `device` in `dtype` (no float32 copy on the host first: a 13B model initialises on the GPU)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(p), dtype=dtype)
    model.set_attn_implementation(attn)
    return model.eval()


def make_inputs(p: Preset, batch: int, system_tokens: int = SYSTEM_TOKENS, text_tokens: int = TEXT_TOKENS,
                device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """LLaVA-1.5 prompts: BOS + ``system_tokens - 1`` system tokens, one image (``p.image_tokens``
    image tokens), ``text_tokens`` question tokens; random ordinary token ids (different per
    row), one random picture per row, no padding."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = 3, min(p.image_token_id, p.vocab)
    rows = []
    for _ in range(batch):
        rows.append(torch.cat([
            torch.tensor([1]),
            torch.randint(lo, hi, (system_tokens - 1,), generator=g),
            torch.full((p.image_tokens,), p.image_token_id),
            torch.randint(lo, hi, (text_tokens,), generator=g),
        ]))
    ids = torch.stack(rows)
    pixels = torch.randn(batch, 3, p.image_size, p.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


# --------------------------------------------------------------------------------------------
# FLOPs and bytes (multiply-adds, as VTW.md's formula counts them)


def decoder_flops(p: Preset, n_all: float, n_text: float, k: int | None) -> float:
    """Decoder-layer prefill multiply-adds of one prompt (VTW.md), withdrawal at k (None: none)."""
    return prefill_flops(n_all, n_text, p.hidden, p.intermediate, p.layers, k)


def vision_flops(p: Preset) -> float:
    """Multiply-adds of one image through the vision tower (patch embedding, every CLIP layer:
    ``4nd^2 + 2n^2d + 2ndm`` on n = patches + CLS) and the projector (two linear layers on the
    image tokens). Withdrawal does not change them."""
    n_img = p.image_tokens
    n = n_img + 1
    d, m = p.vision_hidden, p.vision_intermediate
    patch = n_img * 3 * p.patch_size ** 2 * d
    layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    projector = n_img * (d * p.hidden + p.hidden * p.hidden)
    return patch + p.vision_layers * layer + projector


def head_flops(p: Preset) -> float:
    """The language-model head on the last position (``logits_to_keep=1``)."""
    return p.hidden * p.vocab


def ideal(p: Preset, n_all: float, n_text: float, k: int | None) -> dict:
    """Ideal prefill speedups of withdrawal at k over the full model, per prompt of n_all tokens
    of which n_text are text: ``decoder`` (VTW.md's formula, the decoder layers alone) and
    ``end_to_end`` (the vision tower, projector and head, which withdrawal does not reduce,
    added to both sides); ``cut``: the share of the decoder's FLOPs withdrawal removes;
    ``vision_share``: the vision tower's + projector's share of the full prefill."""
    full = decoder_flops(p, n_all, n_text, None)
    cut = decoder_flops(p, n_all, n_text, k)
    fixed = vision_flops(p) * (n_all - n_text) / p.image_tokens + head_flops(p)
    vis = vision_flops(p) * (n_all - n_text) / p.image_tokens
    return {"decoder": full / cut, "end_to_end": (full + fixed) / (cut + fixed), "cut": 1 - cut / full,
            "vision_share": vis / (full + fixed), "decoder_flops_full": full, "decoder_flops_withdrawn": cut,
            "other_flops": fixed}


def decode_ideal(p: Preset, batch: int, n_all: int, n_text: int, k: int | None, new_tokens: int,
                 weight_bytes: float, elt: int) -> dict:
    """A bytes model of decode (memory-bound): each step reads `weight_bytes` (decoder layers +
    head) once and every layer's cache once; the caches hold ``n_all`` (layers < k) or ``n_text``
    (layers >= k) prompt tokens plus the tokens generated so far. Returns the bytes per step
    averaged over the steps, full and withdrawn, and their ratio (the ideal decode speedup)."""
    k = p.layers if k is None else k
    per_token = 2 * p.kv_heads * p.head_dim * elt * batch  # one layer's K and V for one token, all rows
    grown = (new_tokens + 1) / 2  # average number of generated tokens in the cache during a step
    full = weight_bytes + p.layers * (n_all + grown) * per_token
    cut = weight_bytes + (k * (n_all + grown) + (p.layers - k) * (n_text + grown)) * per_token
    return {"bytes_full": full, "bytes_withdrawn": cut, "speedup": full / cut}


# --------------------------------------------------------------------------------------------
# Measurement


def _set_mode(model, k: int | None) -> None:
    if k is None:
        disable(model)
    else:
        enable(model, k)


def _next_token(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    # Random weights: never pick the image token (or the ids above it), so that every generated
    # token is text in both modes.
    return logits[:, -1, :image_token_id].argmax(-1)


@torch.inference_mode()
def _prefill(model, inputs, image_token_id):
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return _tf.output_cache(out), _next_token(out.logits, image_token_id)


@torch.inference_mode()
def _decode(model, cache, tok, attention_mask, steps: int, image_token_id):
    am = attention_mask
    ones = am.new_ones(am.shape[0], 1)
    for _ in range(steps):
        am = torch.cat([am, ones], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=am, **_tf.cache_kwargs(cache), use_cache=True,
                    logits_to_keep=1)
        tok = _next_token(out.logits, image_token_id)
    return tok


def _rotations(ks: list, rounds: int):
    """The order of the modes in each round: rotated by one every round (ABBA-like balance)."""
    for r in range(rounds):
        s = r % len(ks)
        yield ks[s:] + ks[:s]


def measure(model, p: Preset, inputs: dict, ks: list, *, repeats: int, new_tokens: int = 0, warmup: int = 1,
            device="cpu") -> dict:
    """Alternating measurement of the modes `ks` (None = the full model, an int = withdrawal at
    that K). Each round runs every mode once, in a rotated order: a timed prefill, then (if
    `new_tokens`) `new_tokens` timed decode steps on its cache. Returns, per mode, the lists of
    prefill and decode seconds and the KV-cache bytes per layer after prefill and after decode,
    and on CUDA the peak memory allocated during the round over what was allocated before."""
    dev = torch.device(device)
    res = {k: {"prefill_s": [], "decode_s": [], "kv_prefill": None, "kv_end": None, "peak_extra_bytes": None}
           for k in ks}
    for _ in range(warmup):
        for k in ks:
            _set_mode(model, k)
            cache, tok = _prefill(model, inputs, p.image_token_id)
            if new_tokens:
                _decode(model, cache, tok, inputs["attention_mask"], min(new_tokens, 2), p.image_token_id)
            del cache, tok
    sync(dev)
    for order in _rotations(list(ks), repeats):
        for k in order:
            _set_mode(model, k)
            if dev.type == "cuda":
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.perf_counter()
            cache, tok = _prefill(model, inputs, p.image_token_id)
            sync(dev)
            t1 = time.perf_counter()
            r = res[k]
            r["prefill_s"].append(t1 - t0)
            r["kv_prefill"] = kv_bytes(cache)
            if new_tokens:
                _decode(model, cache, tok, inputs["attention_mask"], new_tokens, p.image_token_id)
                sync(dev)
                r["decode_s"].append(time.perf_counter() - t1)
            r["kv_end"] = kv_bytes(cache)
            if dev.type == "cuda":
                r["peak_extra_bytes"] = torch.cuda.max_memory_allocated(dev) - base
            del cache, tok
    disable(model)
    return res


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class BenchConfig:
    preset: str = "small"
    batches: tuple = (2,)
    layer: int | None = None  # default: L // 2
    system_tokens: int = SYSTEM_TOKENS
    text_tokens: int = TEXT_TOKENS
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    repeats: int = 5
    warmup: int = 1
    new_tokens: int = 32
    sweep: list | None = None  # layers K to sweep (prefill only), or None
    attn: str = "sdpa"
    out: str | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


def machine_info(device) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == "cuda":
        i = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(i)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _available_bytes(device) -> int | None:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def param_count(p: Preset) -> dict:
    """Parameters of the decoder layers, the head, the embedding and the vision side."""
    d, m = p.hidden, p.intermediate
    kv = p.kv_heads * p.head_dim
    layer = d * d * 2 + 2 * d * kv + 3 * d * m + 2 * d
    vd, vm = p.vision_hidden, p.vision_intermediate
    vision = (3 * p.patch_size ** 2 * vd + vd + (p.image_tokens + 1) * vd  # patches, CLS, positions
              + p.vision_layers * (4 * vd * vd + 4 * vd + 2 * vd * vm + vm + vd + 4 * vd) + 4 * vd  # layers, norms
              + vd * d + d + d * d + d)  # projector
    return {"decoder": p.layers * layer + d, "head": d * p.vocab, "embedding": d * p.vocab, "vision": vision}


def estimate_bytes(p: Preset, batch: int, n_all: int, new_tokens: int, elt: int) -> int:
    """A rough upper estimate of the memory a run needs: weights, the full model's KV cache, and
    the largest activations of a prefill (a few [B, S, max(m, 3d)] tensors)."""
    weights = sum(param_count(p).values()) * elt
    kv = p.layers * 2 * batch * p.kv_heads * p.head_dim * (n_all + new_tokens) * elt
    act = 6 * batch * n_all * max(p.intermediate, 3 * p.hidden) * elt
    return weights + kv + act


def _resolve_dtype(p: Preset, dtype: str, device) -> torch.dtype:
    if dtype == "auto":
        dtype = p.dtype if torch.device(device).type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise BenchError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_config(cfg: BenchConfig) -> tuple[Preset, torch.device, torch.dtype, int]:
    """Validates `cfg`; returns the preset, device, dtype and K. BenchError on bad input."""
    if cfg.preset not in PRESETS:
        raise BenchError(f"--preset must be one of {', '.join(PRESETS)}; got {cfg.preset!r}")
    p = PRESETS[cfg.preset]
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, TypeError) as e:
        raise BenchError(f"--device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {cfg.device}: torch sees no CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda[:N], got {cfg.device!r}")
    dtype = _resolve_dtype(p, cfg.dtype, dev)
    K = p.layers // 2 if cfg.layer is None else cfg.layer
    if not 0 <= K <= p.layers:
        raise BenchError(f"--layer: preset {p.name} has {p.layers} decoder layers, so K must be in 0 .. {p.layers} "
                         f"({p.layers} withdraws nothing), got {K}")
    for k in cfg.sweep or []:
        if not 0 <= k <= p.layers:
            raise BenchError(f"--sweep: preset {p.name} has {p.layers} decoder layers (K in 0 .. {p.layers}), got {k}")
    if not cfg.batches or min(cfg.batches) < 1:
        raise BenchError(f"--batch must be positive integers, got {cfg.batches}")
    if cfg.system_tokens < 1 or cfg.text_tokens < 1:
        raise BenchError("--system-tokens and --text-tokens must be >= 1 (the prompt ends with text)")
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.new_tokens < 0:
        raise BenchError("--repeats must be >= 1, --warmup and --new-tokens >= 0")
    if cfg.attn not in ("sdpa", "eager", "vtw"):
        raise BenchError(f"--attn must be sdpa, eager or vtw, got {cfg.attn!r}")
    return p, dev, dtype, K


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(p: Preset, batch: int, K: int, n_all: int, n_text: int, new_tokens: int, res: dict,
              weight_bytes: float, elt: int) -> dict:
    """The figures of one batch size from `measure`'s result for modes None and K."""
    full, cut = res[None], res[K]
    fp, cp = _median(full["prefill_s"]), _median(cut["prefill_s"])
    idl = ideal(p, n_all, n_text, K)
    row = {"batch": batch, "K": K, "prefill_s": {"full": full["prefill_s"], "withdrawn": cut["prefill_s"]},
           "prefill_median_s": {"full": fp, "withdrawn": cp}, "prefill_speedup": fp / cp,
           "prefill_speedup_paired": _paired(full["prefill_s"], cut["prefill_s"]),
           "ideal_decoder": idl["decoder"], "ideal_end_to_end": idl["end_to_end"],
           "ratio_decoder": (fp / cp) / idl["decoder"], "ratio_end_to_end": (fp / cp) / idl["end_to_end"],
           "decoder_flops_cut": idl["cut"], "vision_share": idl["vision_share"]}
    if new_tokens:
        fd, cd = _median(full["decode_s"]), _median(cut["decode_s"])
        di = decode_ideal(p, batch, n_all, n_text, K, new_tokens, weight_bytes, elt)
        row.update({"decode_s": {"full": full["decode_s"], "withdrawn": cut["decode_s"]},
                    "decode_tokens_per_s": {"full": batch * new_tokens / fd, "withdrawn": batch * new_tokens / cd},
                    "decode_speedup": fd / cd, "decode_speedup_paired": _paired(full["decode_s"], cut["decode_s"]),
                    "decode_ideal_bytes_model": di["speedup"]})
    kv = {}
    for name, r in (("full", full), ("withdrawn", cut)):
        per = r["kv_end"] or []
        kv[name] = {"total": sum(per), "deep": sum(per[K:]), "per_layer": per,
                    "after_prefill": sum(r["kv_prefill"] or [])}
        if r["peak_extra_bytes"] is not None:
            kv[name]["cuda_peak_extra_bytes"] = r["peak_extra_bytes"]
    visual = n_all - n_text
    kv["visual_fraction_deep"] = visual / (n_all + new_tokens)
    if kv["full"]["deep"]:
        kv["deep_cut"] = 1 - kv["withdrawn"]["deep"] / kv["full"]["deep"]
    if kv["full"]["total"]:
        kv["total_cut"] = 1 - kv["withdrawn"]["total"] / kv["full"]["total"]
    row["kv"] = kv
    return row


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def format_rows(rows: list[dict], new_tokens: int) -> str:
    out = [f"{'batch':>5}  {'K':>3}  {'prefill full':>12}  {'withdrawn':>10}  {'speedup':>7}  {'(paired)':>8}  "
           f"{'ideal VTW.md':>12}  {'ratio':>5}  {'ideal e2e':>9}  {'ratio':>5}"]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['batch']:>5}  {r.get('K', '-'):>3}  skipped: {r['skipped']}")
            continue
        m = r["prefill_median_s"]
        out.append(f"{r['batch']:>5}  {r['K']:>3}  {_fmt_s(m['full']):>12}  {_fmt_s(m['withdrawn']):>10}  "
                   f"{r['prefill_speedup']:6.2f}x  {r['prefill_speedup_paired']:7.2f}x  {r['ideal_decoder']:11.2f}x  "
                   f"{r['ratio_decoder']:5.2f}  {r['ideal_end_to_end']:8.2f}x  {r['ratio_end_to_end']:5.2f}")
    if new_tokens:
        out.append("")
        out.append(f"{'batch':>5}  {'K':>3}  {'decode full':>14}  {'withdrawn':>14}  {'speedup':>7}  {'(paired)':>8}  "
                   f"{'ideal (bytes model)':>19}")
        for r in rows:
            if "skipped" in r or "decode_tokens_per_s" not in r:
                continue
            t = r["decode_tokens_per_s"]
            out.append(f"{r['batch']:>5}  {r['K']:>3}  {t['full']:9.1f} tok/s  {t['withdrawn']:9.1f} tok/s  "
                       f"{r['decode_speedup']:6.2f}x  {r['decode_speedup_paired']:7.2f}x  "
                       f"{r['decode_ideal_bytes_model']:18.2f}x")
    out.append("")
    out.append(f"{'batch':>5}  {'K':>3}  {'KV cache full':>13}  {'withdrawn':>10}  {'cut':>5}  "
               f"{'deep layers full':>16}  {'withdrawn':>10}  {'cut':>5}  {'visual share':>12}"
               + ("  CUDA peak over weights (full / withdrawn)" if any(
                   "cuda_peak_extra_bytes" in r.get("kv", {}).get("full", {}) for r in rows) else ""))
    for r in rows:
        if "skipped" in r:
            continue
        kv = r["kv"]
        line = (f"{r['batch']:>5}  {r['K']:>3}  {fmt_bytes(kv['full']['total']):>13}  "
                f"{fmt_bytes(kv['withdrawn']['total']):>10}  {kv.get('total_cut', 0):5.0%}  "
                f"{fmt_bytes(kv['full']['deep']):>16}  {fmt_bytes(kv['withdrawn']['deep']):>10}  "
                f"{kv.get('deep_cut', 0):5.0%}  {kv['visual_fraction_deep']:12.0%}")
        if "cuda_peak_extra_bytes" in kv["full"]:
            line += (f"  {fmt_bytes(kv['full']['cuda_peak_extra_bytes'])} / "
                     f"{fmt_bytes(kv['withdrawn']['cuda_peak_extra_bytes'])}")
        out.append(line)
    return "\n".join(out)


def run_bench(cfg: BenchConfig, print_fn=print) -> dict:
    """Runs the benchmark described by `cfg`, prints the tables, writes ``bench.json`` (and
    ``bench_sweep.png`` with a sweep) into ``cfg.out`` when given; returns the JSON object."""
    p, dev, dtype, K = check_config(cfg)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif dev.type == "cpu":
        torch.set_num_threads(1)  # the steadiest timings on a shared machine
    try:
        return _run(cfg, p, dev, dtype, K, print_fn)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: BenchConfig, p: Preset, dev: torch.device, dtype: torch.dtype, K: int, print_fn) -> dict:
    out_dir = Path(cfg.out) if cfg.out else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BenchError(f"cannot create --out folder {out_dir}: {e}") from None
    elt = torch.empty((), dtype=dtype).element_size()
    n_text = cfg.system_tokens + cfg.text_tokens
    n_all = n_text + p.image_tokens
    info = machine_info(dev)
    avail = _available_bytes(dev)
    weights_need = sum(param_count(p).values()) * elt
    if avail is not None and weights_need > avail:
        raise BenchError(f"preset {p.name} needs about {fmt_bytes(weights_need)} for its weights in "
                         f"{str(dtype).replace('torch.', '')}, but {dev} has {fmt_bytes(avail)} free")
    idl = ideal(p, n_all, n_text, K)
    print_fn(f"vtw bench: preset {p.name} ({p.about})")
    print_fn(f"  decoder {p.layers} layers, hidden {p.hidden}, MLP {p.intermediate}, {p.heads} heads; vision tower "
             f"CLIP {p.vision_layers} layers, hidden {p.vision_hidden}, {p.image_size} px / patch {p.patch_size} -> "
             f"{p.image_tokens} image tokens; random weights; {str(dtype).replace('torch.', '')} on {dev}"
             + (f", {torch.get_num_threads()} thread(s)" if dev.type == "cpu" else f" ({info.get('gpu')})")
             + f"; attention {cfg.attn}")
    print_fn(f"  prompt per row: {cfg.system_tokens} system + {p.image_tokens} image + {cfg.text_tokens} text = "
             f"{n_all} tokens ({n_text} kept from layer K); K = {K} of {p.layers}")
    print_fn(f"  multiply-adds per prompt: decoder {idl['decoder_flops_full'] / 1e9:.2f} G full, "
             f"{idl['decoder_flops_withdrawn'] / 1e9:.2f} G withdrawn ({idl['cut']:.1%} cut); vision tower + "
             f"projector + head {idl['other_flops'] / 1e9:.2f} G ({idl['vision_share']:.1%} of the full prefill is "
             "the vision tower + projector)")
    print_fn(f"  {info['cpu']}, {info['cpus']} CPUs, load average {info.get('load_average')}; torch {info['torch']}; "
             f"{cfg.repeats} alternating rounds after {cfg.warmup} warm-up; decode: {cfg.new_tokens} new tokens")
    t_build = time.perf_counter()
    try:
        model = build_model(p, dev, dtype, cfg.attn, cfg.seed)
    except torch.cuda.OutOfMemoryError:
        raise BenchError(f"out of GPU memory building preset {p.name}") from None
    print_fn(f"  model built in {time.perf_counter() - t_build:.1f} s")
    counts = param_count(p)
    weight_bytes = (counts["decoder"] + counts["head"]) * elt
    rows = []
    sweep = []
    for B in cfg.batches:
        need_b = estimate_bytes(p, B, n_all, cfg.new_tokens, elt) - weights_need  # the weights are in place
        free = _available_bytes(dev)
        if free is not None and need_b > free:
            rows.append({"batch": B, "K": K, "skipped": f"needs about {fmt_bytes(need_b)} beyond the weights, "
                                                        f"{fmt_bytes(free)} free"})
            print_fn(f"  batch {B}: skipped ({rows[-1]['skipped']})")
            continue
        inputs = make_inputs(p, B, cfg.system_tokens, cfg.text_tokens, dev, dtype, cfg.seed + B)
        try:
            t0 = time.perf_counter()
            res = measure(model, p, inputs, [None, K], repeats=cfg.repeats, new_tokens=cfg.new_tokens,
                          warmup=cfg.warmup, device=dev)
            row = summarise(p, B, K, n_all, n_text, cfg.new_tokens, res, weight_bytes, elt)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print_fn(f"  batch {B}: prefill {row['prefill_speedup']:.2f}x (ideal {row['ideal_decoder']:.2f}x), "
                     + (f"decode {row['decode_speedup']:.2f}x, " if cfg.new_tokens else "")
                     + f"{row['seconds']:.1f} s")
            if cfg.sweep:
                ks = list(cfg.sweep)
                t0 = time.perf_counter()
                sres = measure(model, p, inputs, [None] + ks, repeats=cfg.repeats, warmup=cfg.warmup, device=dev)
                fm = _median(sres[None]["prefill_s"])
                for k in ks:
                    i = ideal(p, n_all, n_text, k)
                    sweep.append({"batch": B, "K": k, "prefill_median_s": _median(sres[k]["prefill_s"]),
                                  "full_median_s": fm, "speedup": fm / _median(sres[k]["prefill_s"]),
                                  "speedup_paired": _paired(sres[None]["prefill_s"], sres[k]["prefill_s"]),
                                  "ideal_decoder": i["decoder"], "ideal_end_to_end": i["end_to_end"]})
                print_fn(f"  batch {B}: sweep of {len(ks)} layers K in {time.perf_counter() - t0:.1f} s")
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": B, "K": K, "skipped": "out of GPU memory"})
            print_fn(f"  batch {B}: skipped (out of GPU memory)")
        finally:
            del inputs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    info_end = {"load_average_end": [round(x, 2) for x in os.getloadavg()]} if hasattr(os, "getloadavg") else {}
    print_fn("")
    print_fn("prefill: time to first token, median of the rounds; speedup = full / withdrawn (paired: median of "
             "the per-round ratios); ideal VTW.md = decoder FLOPs ratio; ideal e2e also counts the vision tower, "
             "projector and head; ratio = measured / ideal")
    print_fn(format_rows(rows, cfg.new_tokens))
    if sweep:
        print_fn("")
        print_fn(f"{'batch':>5}  {'K':>3}  {'prefill':>10}  {'speedup':>7}  {'(paired)':>8}  {'ideal VTW.md':>12}  "
                 f"{'ratio':>5}  {'ideal e2e':>9}")
        for s in sweep:
            print_fn(f"{s['batch']:>5}  {s['K']:>3}  {_fmt_s(s['prefill_median_s']):>10}  {s['speedup']:6.2f}x  "
                     f"{s['speedup_paired']:7.2f}x  {s['ideal_decoder']:11.2f}x  "
                     f"{s['speedup'] / s['ideal_decoder']:5.2f}  {s['ideal_end_to_end']:8.2f}x")
    print_fn(f"load average at the end {info_end.get('load_average_end')}")
    result = {"config": {k: v for k, v in asdict(cfg).items() if k != "extra"} | cfg.extra,
              "preset": asdict(p), "dtype": str(dtype).replace("torch.", ""), "machine": info | info_end,
              "prompt": {"system": cfg.system_tokens, "image": p.image_tokens, "text": cfg.text_tokens,
                         "n_all": n_all, "n_text": n_text},
              "flops": {"decoder_full": idl["decoder_flops_full"], "vision_projector_head": idl["other_flops"],
                        "vision_share": idl["vision_share"]},
              "rows": rows, "sweep": sweep}
    if out_dir is not None:
        try:
            j = out_dir / "bench.json"
            j.write_text(json.dumps(result, indent=1))
            written = [j]
            if sweep:
                png = out_dir / "bench_sweep.png"
                plot_sweep(sweep, p, title=f"vtw bench: prefill speedup vs K, preset {p.name}, {dev}, "
                                           f"{str(dtype).replace('torch.', '')}").save(png)
                written.append(png)
        except OSError as e:
            raise BenchError(f"cannot write to --out {out_dir}: {e}") from None
        print_fn("wrote " + " and ".join(str(w) for w in written))
    return result


# --------------------------------------------------------------------------------------------
# The plot (Pillow only, in the style of vtw.calibrate's)

_COLOURS = [(30, 70, 200), (200, 120, 20), (20, 140, 40), (150, 30, 150), (0, 140, 150)]


def plot_sweep(sweep: list[dict], p: Preset, title: str = "", size: tuple[int, int] = (720, 440)):
    """A PIL image of the measured prefill speedup against K (one line per batch size), with
    the ideal speedups (VTW.md's decoder formula dashed, end to end dotted)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, W - 24, 44, H - 56
    d.text((left, 12), title or "vtw bench: prefill speedup against K", fill="black", font=font)
    ks = sorted({s["K"] for s in sweep})
    kmin, kmax = 0, p.layers
    ideal_pts = {s["K"]: (s["ideal_decoder"], s["ideal_end_to_end"]) for s in sweep}
    vals = [s["speedup"] for s in sweep] + [v for pair in ideal_pts.values() for v in pair] + [1.0]
    vals = [v for v in vals if math.isfinite(v)]
    lo = min(0.9, math.floor(min(vals) * 10) / 10)
    hi = math.ceil(max(vals) * 10) / 10 + 0.1

    def X(k):
        return left + 10 + (right - left - 20) * (k - kmin) / max(kmax - kmin, 1)

    def Y(v):
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    step = 0.1 if hi - lo <= 1.5 else (0.25 if hi - lo <= 4 else 1.0)
    v = math.ceil(lo / step) * step
    while v <= hi + 1e-9:
        y = Y(v)
        d.line([left, y, left - 5, y], fill="black")
        d.line([left + 1, y, right - 1, y], fill=(230, 230, 230) if abs(v - 1) > 1e-9 else (160, 160, 160))
        d.text((left - 40, y - 6), f"{v:.2f}x" if step < 0.25 else f"{v:.1f}x", fill="black", font=font)
        v += step
    kstep = max(1, (kmax - kmin) // 16 + 1)
    for k in range(kmin, kmax + 1, kstep):
        d.line([X(k), bottom, X(k), bottom + 5], fill="black")
        d.text((X(k) - 4, bottom + 8), str(k), fill="black", font=font)
    d.text(((left + right) // 2 - 110, H - 24), "withdrawal layer K (0-based; K = L: nothing withdrawn)",
           fill="black", font=font)
    d.text((8, top - 16), "prefill speedup (full / withdrawn)", fill="black", font=font)
    d.rectangle([left, top, right, bottom], outline="black")

    def dashed(pts, colour, dash, gap):
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            length = math.hypot(x1 - x0, y1 - y0)
            t = 0.0
            while t < length:
                t1 = min(t + dash, length)
                d.line([x0 + (x1 - x0) * t / length, y0 + (y1 - y0) * t / length,
                        x0 + (x1 - x0) * t1 / length, y0 + (y1 - y0) * t1 / length], fill=colour, width=2)
                t += dash + gap

    grey = (90, 90, 90)
    dashed([(X(k), Y(ideal_pts[k][0])) for k in ks], grey, 8, 6)
    dashed([(X(k), Y(ideal_pts[k][1])) for k in ks], grey, 2, 4)
    batches = sorted({s["batch"] for s in sweep})
    legend = [("ideal, decoder FLOPs (VTW.md)", grey, "dash"), ("ideal, end to end (+ vision tower)", grey, "dot")]
    for i, B in enumerate(batches):
        c = _COLOURS[i % len(_COLOURS)]
        pts = [(X(s["K"]), Y(s["speedup"])) for s in sorted(sweep, key=lambda s: s["K"]) if s["batch"] == B]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        legend.append((f"measured, batch {B}", c, "line"))
    ly = top + 8
    for text, c, kind in legend:
        lx = right - 230
        if kind == "line":
            d.line([lx, ly + 6, lx + 24, ly + 6], fill=c, width=2)
        elif kind == "dash":
            dashed([(lx, ly + 6), (lx + 24, ly + 6)], c, 8, 6)
        else:
            dashed([(lx, ly + 6), (lx + 24, ly + 6)], c, 2, 4)
        d.text((lx + 30, ly), text, fill="black", font=font)
        ly += 16
    return img
