#!/usr/bin/env bash
# One command on a GPU machine: build vtw for the GPU present, run the GPU tests, run
# compute-sanitizer (memcheck, racecheck) over the small GPU tests of the data-moving kernels,
# and print the GPU benchmark tables. Stops at the first failing step, naming it, with a
# non-zero exit status. Meant to finish well inside 10 minutes on one H100.
#
#   bash bench/gpu_check.sh                 (from anywhere; PYTHON=... to pick the interpreter)
#   VTW_SKIP_BUILD=1 bash bench/gpu_check.sh   (reuse an existing build)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY="$(command -v python3 || command -v python)"
  fi
fi
STEP="start"
trap 'rc=$?; if [[ $rc -ne 0 ]]; then echo; echo "gpu_check: FAILED at step: $STEP (exit status $rc)" >&2; fi' EXIT
step() { STEP="$1"; echo; echo "==== gpu_check: $1 ($(date +%T))"; }
export PYTHONUNBUFFERED=1

step "0/4 environment"
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: no NVIDIA driver here" >&2; exit 1; }
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda); assert torch.cuda.is_available(), 'torch sees no GPU'"
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')"
[[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]] || { echo "could not read the compute capability (got '$CAP')" >&2; exit 1; }

step "1/4 build for sm_${CAP/./} (TORCH_CUDA_ARCH_LIST=$CAP)"
if [[ "${VTW_SKIP_BUILD:-0}" != "1" ]]; then
  t0=$SECONDS
  VTW_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$CAP" "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
  echo "build took $((SECONDS - t0)) s"
fi
"$PY" -c "
import vtw_kernels as v
assert v.WITH_CUDA, v.build_hint()
for op in ('withdraw', 'compact_kv_'):
    b = v.available_backends(op)
    assert b[:2] == ['cuda', 'triton'], (op, b)
    print(op, b)
"

step "2/4 GPU tests (pytest -m gpu tests/)"
"$PY" -m pytest -m gpu tests/ -q -x -p no:cacheprovider

step "3/4 compute-sanitizer (memcheck, racecheck) over the small GPU tests of withdraw / compact_kv_"
SAN=""
for cand in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
            /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
            /opt/nvidia/nsight-compute/*/host/*/compute-sanitizer; do
  if [[ -n "$cand" && -x "$cand" ]]; then SAN="$cand"; break; fi
done
if [[ -z "$SAN" ]]; then  # the pip wheel (nvidia-cuda-sanitizer-api*) ships the binary too
  SAN="$("$PY" - <<'EOF' || true
import glob, os
try:
    import nvidia
    for base in nvidia.__path__:
        for p in sorted(glob.glob(os.path.join(base, "**", "compute-sanitizer"), recursive=True)):
            if os.path.isfile(p) and os.access(p, os.X_OK):
                print(p)
                raise SystemExit
except ImportError:
    pass
EOF
)"
fi
if [[ -z "$SAN" ]]; then
  echo "compute-sanitizer NOT FOUND (not on PATH, not in \$CUDA_HOME/bin or /usr/local/cuda*/bin, no pip" >&2
  echo "nvidia-cuda-sanitizer-api wheel): install it or set PATH; the sanitizer step cannot run." >&2
  exit 1
fi
echo "using $SAN"
SUBSET=(tests/test_cuda_data.py -m gpu -k "small and not torch" -q -x -p no:cacheprovider)
# Without the caching allocator every tensor is its own allocation, so memcheck sees writes
# past a tensor's end that would otherwise land inside a cached block.
for tool in memcheck racecheck; do
  STEP="3/4 compute-sanitizer --tool $tool"
  echo "-- $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
    "$PY" -m pytest "${SUBSET[@]}"
done

step "4/4 GPU benchmarks (pytest bench/ --benchmark-only -k gpu)"
"$PY" -m pytest bench/ --benchmark-only -k gpu -q -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name

echo
echo "gpu_check: all steps passed"
