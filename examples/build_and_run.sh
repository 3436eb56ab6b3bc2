#!/usr/bin/env bash
# Configures the CMake build of the vtw operator library (libvtw_ops.so) against the libtorch
# of the active Python's torch, builds it with the C++ example, and runs the example as a ctest
# test. Exits non-zero if any step fails. Used by CI; see docs/cmake.md.
#
# Environment:
#   PYTHON             the Python whose torch to build against (default: python, else python3)
#   VTW_CMAKE_BUILD    build folder (default: <repo>/build-cmake)
#   VTW_CMAKE_ARGS     extra configure arguments, e.g. "-DVTW_WITH_CUDA=ON"
#   VTW_CMAKE_JOBS     parallel build jobs (default: 2)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${VTW_CMAKE_BUILD:-$root/build-cmake}"
jobs="${VTW_CMAKE_JOBS:-2}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  python="$(command -v python || command -v python3 || true)"
fi
if [[ -z "$python" ]]; then
  echo "build_and_run.sh: no python found; set PYTHON to the interpreter that has torch" >&2
  exit 2
fi
prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

start=$(date +%s)
# shellcheck disable=SC2086  # VTW_CMAKE_ARGS is a list of arguments
cmake -S "$root" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release \
  ${VTW_CMAKE_ARGS:-}
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure
echo "build_and_run.sh: configure + build + ctest passed in $(( $(date +%s) - start )) s"
