"""vtw.vllm is never silently stock: after the model is loaded, the worker checks that withdrawal is
wired into the model runner actually in use and otherwise refuses to start with a one-line error
naming that runner and the vLLM version; the "withdrawn from decoder layer K" log appears only
once the wiring succeeded, and K = L logs that withdrawal is off. Runs under whichever runner the
process uses (V1 by default on CPU; Model Runner V2 through tests/test_vllm_mrv2.py)."""

import logging
import os

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

from vtw.vllm import _version, runners, tiny  # noqa: E402

LAYERS = 4
MRV2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
RUNNER = "vllm.v1.worker.cpu.model_runner.CPUModelRunner" if MRV2 else "vllm.v1.worker.cpu_model_runner.CPUModelRunner"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava(tmp_path_factory.mktemp("tiny_llava"), layers=LAYERS)


def _logged(capfd, caplog):
    """What vLLM logged: through pytest's log capture, or to stdout when vLLM's own handler wrote it."""
    return capfd.readouterr().out + "\n" + caplog.text


def _engine(folder, layer):
    from vllm import LLM

    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=128,
               max_num_batched_tokens=32, max_num_seqs=2, seed=0, block_size=32, num_gpu_blocks_override=8,
               hf_overrides={"vtw_layer": layer, "vtw_kv": "shared"})


def test_refuses_a_runner_it_is_not_wired_into(folder, monkeypatch, capfd, caplog):
    caplog.set_level(logging.INFO)
    # the runner-specific wiring does nothing, as on a runner vtw does not know
    from vtw.vllm.runners import mrv2, v1

    monkeypatch.setattr(v1, "_load", lambda runner: None)
    monkeypatch.setattr(mrv2, "_wire", lambda vllm_config, model: None)
    with pytest.raises(Exception) as info:
        _engine(folder, 2)
    msg = str(info.value)
    assert "is not wired into the model runner in use" in msg, msg
    assert RUNNER in msg and f"vLLM {_version.installed()}" in msg, msg
    assert "\n" not in msg
    assert "withdrawn from decoder layer" not in _logged(capfd, caplog)


def test_logs_withdrawal_once_wired(folder, capfd, caplog):
    caplog.set_level(logging.INFO)
    llm = _engine(folder, 1)
    try:
        out = _logged(capfd, caplog)
        lines = [ln for ln in out.splitlines() if "withdrawn from decoder layer" in ln]
        assert lines, out[-3000:]  # (once per worker; pytest's capture and vLLM's handler may both show it)
        for line in lines:
            assert "layer 1 of 4 (kv: shared; runner: " in line and ("Model Runner V2" in line) == MRV2, line
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        assert runners.runner_name(runner) == RUNNER
    finally:
        del llm


def test_layer_equal_to_depth_logs_off(folder, capfd, caplog):
    caplog.set_level(logging.INFO)
    llm = _engine(folder, LAYERS)
    try:
        out = _logged(capfd, caplog)
        assert "withdrawn from decoder layer" not in out
        assert f"vtw_layer = {LAYERS} = the number of decoder layers: withdrawal is off" in out, out[-3000:]
    finally:
        del llm
