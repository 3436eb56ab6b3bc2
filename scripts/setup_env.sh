#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv at the repository root, installs what vtw
# needs and builds the package in editable mode. Safe to run again: it reuses what is there and
# the build is incremental. Source it or run it; other scripts call it.
#
#   VTW_PYTHON=python3.11     interpreter for a new venv (default: python3)
#   VTW_BUILD_CUDA=0|1        force a CPU-only build (0) or require CUDA (1); default: CUDA
#                             kernels compile when nvcc and a CUDA build of torch are present
#   TORCH_CUDA_ARCH_LIST      GPU architectures to compile (default here: the local GPU's, or
#                             9.0 without a GPU; a plain `pip install .` builds the full list)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ ! -x .venv/bin/python ]; then
  "${VTW_PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

python -m pip install -q --upgrade pip
# torch first (the CUDA 13 build; it compiles CUDA code without a GPU), then the build tools,
# then vtw itself without build isolation so it compiles against this very torch.
python -m pip install -q "torch==2.14.1" ninja pybind11 "setuptools>=64" wheel numpy
python -m pip install -q triton transformers pytest pytest-benchmark hypothesis tqdm pillow

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)
  export TORCH_CUDA_ARCH_LIST="${cap:-9.0}"
fi
python -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "^\s*$" | grep -E "error|Error|vtw setup" || true
python -c "import vtw_kernels, vtw; print('[setup_env]', vtw_kernels.build_hint())"
