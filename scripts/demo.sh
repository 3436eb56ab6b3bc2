#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup_env.sh), then runs `python -m vtw demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
source .venv/bin/activate
python -m vtw demo "$@"
