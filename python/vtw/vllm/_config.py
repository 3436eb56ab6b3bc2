"""Engine-start checks: reads ``vtw_layer`` / ``vtw_kv`` from the model config and refuses (or
adjusts, with a logged warning) what vtw cannot honour."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

logger = logging.getLogger("vllm.vtw")

KV_MODES = ("text_only", "shared")
DEFAULT_KV = "text_only"

# Architectures (vLLM's names) whose language model vtw.vllm knows how to withdraw in.
FAMILIES = {
    "LlavaForConditionalGeneration": "LLaVA-1.5",
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT",
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
    # DeepStack (vision features added to the visual positions after the first decoder layers): the
    # levels >= K are zeroed for the step (vtw.vllm._runner._skip_deepstack)
    "Qwen3VLForConditionalGeneration": "Qwen3-VL",
    "Qwen3VLMoeForConditionalGeneration": "Qwen3-VL-MoE",
    # sliding-window layers: where the window can bind, the deep ones keep their KV by position
    # and attend over original positions (binding_windows, vtw.vllm._window)
    "Gemma3ForConditionalGeneration": "Gemma 3",
    # Pixtral vision: [IMG_BREAK] / [IMG_END] are text, only the image_token_index positions are visual
    "Mistral3ForConditionalGeneration": "Mistral 3",
    # <fake_token_around_image>, <row_i_col_j>, <global-img> are text, only image_token_id is visual
    "Idefics3ForConditionalGeneration": "Idefics3",
    "SmolVLMForConditionalGeneration": "SmolVLM",
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision",
    # InternVL in the HF format (InternVL3-*-hf); vLLM runs it with its InternS1 implementation.
    # Only <IMG_CONTEXT> (the config's image_token_id) is visual; <img> / </img> are text.
    "InternVLForConditionalGeneration": "InternVL",
}
# Families whose video frames vLLM marks with a token id the config does not name (InternVL: the
# tokenizer's <video>, which the HF model does not use): vtw could not tell those positions, so
# video inputs are refused while withdrawal is on.
_VIDEO_ID_NOT_IN_CONFIG = {"InternVLForConditionalGeneration"}
_TOKEN_ID_NAMES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


class SettingError(ValueError):
    """A vtw setting (``vtw_layer`` / ``vtw_kv`` in ``hf_overrides``) the engine cannot honour. Its
    message is one line that names the setting and what is accepted. Raised while vLLM builds its
    config (pydantic wraps it in a ValidationError there); a process that does not catch it (the
    OpenAI server at start) prints only that line (:func:`_excepthook`) and exits with status 1."""


@dataclass(frozen=True)
class Settings:
    layer: int
    num_layers: int
    kv: str
    token_ids: tuple[int, ...]
    family: str
    # deep sliding-window layers whose window can bind: layer index -> window (binding_windows)
    windows: tuple[tuple[int, int], ...] = ()

    @property
    def active(self) -> bool:
        return self.layer < self.num_layers


def _get(cfg, name):
    v = getattr(cfg, name, None)
    if v is None and isinstance(getattr(cfg, "__dict__", None), dict):
        v = cfg.__dict__.get(name)
    return v


def visual_token_ids(hf_config) -> tuple[int, ...]:
    ids = []
    for n in _TOKEN_ID_NAMES:
        v = _get(hf_config, n)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v not in ids:
            ids.append(v)
    return tuple(ids)


def _video_limit(model_config) -> int:
    """Videos a prompt may carry (vLLM's multimodal config; 0 for a text-only model)."""
    mm = getattr(model_config, "multimodal_config", None)
    return 0 if mm is None else int(mm.get_limit_per_prompt("video"))


def settings(model_config) -> Settings | None:
    """The withdrawal asked for by this model config, validated; None when ``vtw_layer`` is not
    given (stock vLLM). Raises SettingError on a setting vtw cannot honour."""
    hf = model_config.hf_config
    layer = _get(hf, "vtw_layer")
    kv = _get(hf, "vtw_kv")
    if layer is None:
        if kv is not None:
            raise SettingError("vtw.vllm: hf_overrides has vtw_kv but no vtw_layer; add "
                               '"vtw_layer": K (an int, the first decoder layer without visual tokens) or drop vtw_kv')
        return None
    from ._version import check

    check()
    arch = model_config.architecture
    if arch not in FAMILIES:
        raise SettingError(f"vtw.vllm: vtw_layer was given for a {arch} model, but vtw.vllm knows only "
                           f"{', '.join(sorted(FAMILIES))}; drop vtw_layer to run it as stock vLLM")
    num_layers = int(model_config.hf_text_config.num_hidden_layers)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SettingError(f"vtw.vllm: vtw_layer must be an int in [0, {num_layers}] (a JSON number), got "
                           f"{layer!r} ({type(layer).__name__})")
    if not 0 <= layer <= num_layers:
        raise SettingError(f"vtw.vllm: vtw_layer must be in [0, {num_layers}] (this model has {num_layers} "
                           f"decoder layers; {num_layers} withdraws nothing), got {layer}")
    kv = DEFAULT_KV if kv is None else kv
    if kv not in KV_MODES:
        raise SettingError(f"vtw.vllm: vtw_kv must be one of {', '.join(map(repr, KV_MODES))}, got {kv!r}")
    token_ids = visual_token_ids(hf)
    if not token_ids:
        raise SettingError(f"vtw.vllm: the {arch} config has no image/video token id "
                           f"({', '.join(_TOKEN_ID_NAMES)}); vtw cannot tell the visual tokens")
    if arch in _VIDEO_ID_NOT_IN_CONFIG and layer < num_layers and _video_limit(model_config) != 0:
        raise SettingError(f"vtw.vllm: vLLM marks a {FAMILIES[arch]} video's frames with the tokenizer's <video> id, "
                           f"which the config does not name, so vtw cannot withdraw them; pass "
                           'limit_mm_per_prompt={"video": 0} (images only) or drop vtw_layer')
    return Settings(layer, num_layers, kv, token_ids, FAMILIES[arch], binding_windows(model_config, layer))


def binding_windows(model_config, layer: int) -> tuple[tuple[int, int], ...]:
    """The sliding-window decoder layers from `layer` on (Gemma 3's ``layer_types``) whose window
    can bind, as (layer index, window) pairs. vtw's definition slides the window over ORIGINAL
    positions (a text token at position p sees the text tokens at (p - W, p]), while the other
    deep layers keep their KV by text rank, where a window would count text ranks; so these keep
    theirs by position, in vLLM's sliding-window KV groups, and attend through vtw.vllm._window.
    Once max_model_len <= W no window binds (p - k < max_model_len <= W), over positions or ranks:
    such a layer is handled like a full-attention one. (vLLM's ``disable_sliding_window`` drops the
    window and caps max_model_len at it: no binding window either.)"""
    text = model_config.hf_text_config
    window = _get(text, "sliding_window")
    types = _get(text, "layer_types")
    if window is None or not types or getattr(model_config, "disable_sliding_window", False):
        return ()
    max_len = int(model_config.max_model_len)
    if int(window) >= max_len:
        return ()
    return tuple((i, int(window)) for i in range(layer, len(types)) if types[i] == "sliding_attention")


def _has_static_graphs() -> bool:
    """Whether the platform captures CUDA graphs (vLLM's CPU platform does not)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.support_static_graph_mode())
    except Exception:
        return False


def verify(vllm_config) -> Settings | None:
    """Called while vLLM builds its config (engine start, every process)."""
    mc = vllm_config.model_config
    if mc is None:
        return None
    s = settings(mc)
    if s is None or not s.active:
        return s
    if s.kv == "text_only" and getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", None) is True:
        raise SettingError('vtw.vllm: vtw_kv="text_only" puts the deep layers in KV cache groups of their own, which '
                           "needs vLLM's hybrid KV cache manager; drop disable_hybrid_kv_cache_manager, or pass "
                           '"vtw_kv": "shared"')
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) != 1:
        raise SettingError("vtw.vllm: pipeline parallelism is not supported with vtw_layer; use "
                           "tensor parallelism (tensor_parallel_size) or drop vtw_layer")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise SettingError("vtw.vllm: speculative decoding is not supported with vtw_layer")
    mm = getattr(mc, "multimodal_config", None)
    pruning = getattr(mm, "is_multimodal_pruning_enabled", None)
    if callable(pruning) and pruning():
        # pruned video tokens change the prompt and Qwen3-VL's positions layout (4 rows per stream)
        raise SettingError("vtw.vllm: video token pruning (video_pruning_rate > 0) is not supported with "
                           "vtw_layer; drop video_pruning_rate or vtw_layer")
    if s.windows:
        layers = ", ".join(str(i) for i, _ in s.windows)
        logger.info("vtw.vllm: decoder layers %s (>= vtw_layer=%d) slide a window of %d tokens, shorter than "
                    "max_model_len=%d: they keep their KV by position in vLLM's sliding-window groups and attend to "
                    "the text tokens of the window over original positions (vtw's own attention in PyTorch)%s",
                    layers, s.layer, s.windows[0][1], int(mc.max_model_len),
                    "; text_only applies to the deep full-attention layers" if s.kv == "text_only" else "")
        kv_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
        if kv_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise SettingError(f"vtw.vllm: kv_cache_dtype={kv_dtype!r} with deep sliding-window layers (>= vtw_layer="
                               f"{s.layer}) whose window binds: vtw's attention there reads an unquantised cache; drop "
                               f"kv_cache_dtype, or pass max_model_len <= {s.windows[0][1]}")
    if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        logger.info("vtw.vllm: prefix caching stays on; hits stop at a request's first visual token (a shared "
                    "text prefix is reused, an image and what follows it is recomputed)")
    # vLLM's compilation stays on: steps whose scheduled tokens are all kept run the compiled
    # graph, steps with visual tokens run eagerly (vtw.vllm._runner). Full CUDA graphs would
    # replay the deep layers' attention metadata of the capture; piecewise ones leave attention
    # (which reads the step's metadata) outside the graphs.
    cc = vllm_config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    if not mc.enforce_eager and _has_static_graphs() and (mode is None or mode.has_full_cudagraphs()):
        from vllm.config import CUDAGraphMode

        logger.info("vtw.vllm: CUDA graphs piecewise (attention outside the graphs) instead of %s: the deep "
                    "layers' attention metadata is built per step", getattr(mode, "name", "the default"))
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    # the "withdrawn from decoder layer K" log comes from the worker, once the wiring into the
    # runner in use succeeded (vtw.vllm.runners.check_wired)
    return s


_installed = False


def setting_error(exc: BaseException | None) -> SettingError | None:
    """The :class:`SettingError` behind `exc`, if any: itself, the error a pydantic ValidationError
    wraps (vLLM's config is a pydantic dataclass), or one in its cause / context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SettingError):
            return exc
        errors = getattr(exc, "errors", None)
        if callable(errors) and type(exc).__name__ == "ValidationError":
            try:
                for err in errors():
                    inner = (err.get("ctx") or {}).get("error")
                    if isinstance(inner, SettingError):
                        return inner
            except Exception:
                pass
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=None):
    """An uncaught vtw setting error ends the process with its one line on stderr (status 1)
    instead of a traceback through vLLM's start-up; anything else goes to the previous hook."""
    err = setting_error(exc)
    if err is None:
        return (_previous or sys.__excepthook__)(exc_type, exc, tb)
    print(f"error: {err}", file=sys.stderr, flush=True)


def _install_excepthook() -> None:
    previous = sys.excepthook
    if getattr(previous, "_vtw", False):
        return

    def hook(exc_type, exc, tb):
        return _excepthook(exc_type, exc, tb, previous)

    hook._vtw = True
    sys.excepthook = hook


def install(supported: bool) -> None:
    """Hooks :func:`verify` into vLLM's config building (VllmConfig.try_verify_and_update_config,
    run in VllmConfig.__post_init__ before the compilation mode is settled). On a vLLM version
    vtw was not written for, only a check that refuses a vtw_layer is hooked in."""
    global _installed
    if _installed:
        return
    _installed = True
    _install_excepthook()
    try:
        from vllm.config import VllmConfig
    except Exception as e:  # never break vLLM's start-up
        logger.warning("vtw.vllm: could not hook into vLLM's config (%s); vtw_layer will be ignored", e)
        return
    name = "try_verify_and_update_config" if supported else "__post_init__"
    orig = getattr(VllmConfig, name, None)
    if orig is None:
        logger.warning("vtw.vllm: VllmConfig.%s not found; vtw_layer will be ignored", name)
        return

    def hooked(self, *args, **kwargs):
        if supported:
            verify(self)
        else:
            mc = getattr(self, "model_config", None)
            if mc is not None and _get(mc.hf_config, "vtw_layer") is not None:
                from ._version import check

                check()
        return orig(self, *args, **kwargs)

    hooked.__wrapped__ = orig
    setattr(VllmConfig, name, hooked)
