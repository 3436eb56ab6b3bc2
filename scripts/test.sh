#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup_env.sh), then runs the test suite, and the C++
# example against libtorch (CMake). Extra arguments go to pytest. VTW_ENV picks the version set
# (see setup_env.sh; scripts/matrix.sh runs another set in a copy of the tree); VTW_TESTS the
# test paths (default: the set's VTW_ENV_TESTS, else tests/); VTW_CMAKE=0 skips the CMake example.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
source .venv/bin/activate
VTW_ENV_TESTS=""
# shellcheck disable=SC1090
source "scripts/envs/${VTW_ENV:-newest}.sh"
if [ -f examples/build_and_run.sh ] && [ "${VTW_CMAKE:-1}" != 0 ]; then
  bash examples/build_and_run.sh
fi
# shellcheck disable=SC2086
python -m pytest ${VTW_TESTS:-${VTW_ENV_TESTS:-tests/}} -q "$@"
