#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup_env.sh), then runs the test suite, and the C++
# example against libtorch (CMake). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
source .venv/bin/activate
if [ -f examples/build_and_run.sh ]; then
  bash examples/build_and_run.sh
fi
python -m pytest tests/ -q "$@"
