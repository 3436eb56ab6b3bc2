#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv at the repository root, installs what vtw
# needs and builds the package in editable mode. Safe to run again: it reuses what is there and
# the build is incremental. Source it or run it; other scripts call it.
#
#   VTW_ENV=newest|gpu-image|vllm the version set (scripts/envs/NAME.sh; default newest). One tree
#                             holds one set (the compiled _C.so lives in the tree): to test
#                             another set use `bash scripts/matrix.sh NAME`, which runs the test
#                             command in a copy of the tree under .matrix/NAME.
#   VTW_PYTHON=python3.11     interpreter for a new venv (default: the set's)
#   VTW_BUILD_CUDA=0|1        force a CPU-only build (0) or require CUDA (1); default: CUDA
#                             kernels compile when nvcc and a CUDA build of torch are present
#   TORCH_CUDA_ARCH_LIST      GPU architectures to compile (default here: the local GPU's, or
#                             9.0 without a GPU; a plain `pip install .` builds the full list)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

env_name="${VTW_ENV:-newest}"
env_file="scripts/envs/${env_name}.sh"
if [ ! -f "$env_file" ]; then
  echo "[setup_env] VTW_ENV=$env_name: no $env_file (sets: $(ls scripts/envs | sed 's/\.sh$//' | tr '\n' ' '))" >&2
  exit 2
fi
VTW_ENV_PYTHON="" VTW_ENV_PYTHON_HINT="" VTW_ENV_TORCH="" VTW_ENV_PACKAGES="" VTW_ENV_INDEX_ARGS=""
# shellcheck disable=SC1090
source "$env_file"
if [ -z "$VTW_ENV_PYTHON" ] || ! "$VTW_ENV_PYTHON" -c 'pass' 2>/dev/null; then
  echo "[setup_env] VTW_ENV=$env_name: no Python interpreter for this set (got '$VTW_ENV_PYTHON'): ${VTW_ENV_PYTHON_HINT:-set VTW_PYTHON}" >&2
  exit 2
fi

if [ -x .venv/bin/python ]; then
  have="$(cat .venv/vtw-env 2>/dev/null || echo main)"
  if [ "$have" = main ] && [ "$env_name" = newest ]; then
    echo "[setup_env] .venv holds the former default set 'main' (Python 3.11, torch 2.14.1); the default is now 'newest' (Python 3.13, torch 2.15.0): remove .venv to build it" >&2
    exit 2
  elif [ "$have" != "$env_name" ]; then
    echo "[setup_env] .venv holds the '$have' set, not '$env_name': run 'bash scripts/matrix.sh $env_name' (a copy of the tree), or remove .venv" >&2
    exit 2
  fi
else
  "$VTW_ENV_PYTHON" -m venv .venv
  echo "$env_name" > .venv/vtw-env
fi
# shellcheck disable=SC1091
source .venv/bin/activate

python -m pip install -q --upgrade pip
# torch first (on newest and gpu-image the CUDA 13 build: it compiles CUDA code without a GPU),
# then the build tools, then vtw itself without build isolation so it compiles against this
# very torch. The set's pins are repeated with the test tools so pip never moves torch.
# shellcheck disable=SC2086
python -m pip install -q $VTW_ENV_INDEX_ARGS "$VTW_ENV_TORCH" ninja pybind11 "setuptools>=77" wheel numpy
# shellcheck disable=SC2086
python -m pip install -q $VTW_ENV_INDEX_ARGS "$VTW_ENV_TORCH" $VTW_ENV_PACKAGES \
  pytest pytest-benchmark hypothesis tqdm pillow

# A set may need a fix-up after its packages are in (e.g. vllm.sh): its env file then defines
# vtw_env_post_install, called here, before vtw is built.
if declare -F vtw_env_post_install >/dev/null; then
  vtw_env_post_install
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)
  export TORCH_CUDA_ARCH_LIST="${cap:-9.0}"
fi
mkdir -p build
if ! python -m pip install --no-build-isolation --no-deps -e . > build/setup_env-pip.log 2>&1; then
  tail -n 60 build/setup_env-pip.log >&2
  echo "[setup_env] building vtw failed (whole log: build/setup_env-pip.log)" >&2
  exit 1
fi
grep -E "\[vtw setup\]" build/setup_env-pip.log || true
python - <<'PY'
import sys, torch, vtw_kernels, vtw
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
import transformers
print(f"[setup_env] Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, triton {tv}; {vtw_kernels.build_hint()}")
PY
