#!/usr/bin/env bash
# Runs the test command (scripts/test.sh) on another version set, in a copy of the tree at
# .matrix/NAME (one tree holds one set: the compiled _C.so lives in the tree). The copy keeps its
# own .venv and build folder between runs, so a second run is incremental.
#
#   bash scripts/matrix.sh gpu-image            # the GPU machine's versions (scripts/envs/)
#   bash scripts/matrix.sh gpu-image -k withdraw   # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
name="${1:?usage: matrix.sh NAME [pytest args] (NAME: $(ls scripts/envs | sed 's/\.sh$//' | tr '\n' ' '))}"
shift
[ -f "scripts/envs/$name.sh" ] || { echo "matrix.sh: no scripts/envs/$name.sh" >&2; exit 2; }
dest=".matrix/$name"
mkdir -p "$dest"
# Refresh the copy: every file but its environment and build outputs is replaced by the tree's
# (tracked files and new files git does not ignore, as they are in the working tree now).
find "$dest" -mindepth 1 -maxdepth 1 ! -name .venv ! -name build ! -name build-cmake -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$dest"
# The design documents beside the repository (../shared), where the tests look for them.
if [ -d "$ROOT/../shared" ] && [ ! -e .matrix/shared ]; then
  ln -s "$(cd "$ROOT/../shared" && pwd)" .matrix/shared
fi
echo "[matrix] $name: running the test command in $dest"
cd "$dest"
VTW_ENV="$name" bash ./scripts/test.sh "$@"
