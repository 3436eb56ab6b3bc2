#!/usr/bin/env bash
# The GPU check, for one lent GPU machine and its 15-minute window, on its image as it is: no
# package installs (nothing can be fetched there), the image's python3, the build on every core.
# Three stages, the most valuable first; each runs alone and writes its log and a JSON of its
# figures under $OUT (when set), so a stage cut short still returns what it measured; each
# prints a short summary table last.
#
#   bash bench/gpu_check.sh 1      build + stage 1 (about 3-5 minutes on an H100/H200):
#                                  every op on CUDA and Triton against the torch reference on
#                                  the device (fresh random data); withdraw / compact_kv_ GB/s
#                                  against the copy bandwidth; varlen / decode attention against
#                                  SDPA; LLaVA-1.5-7B shape prefill at batch 8, decode at batch 32,
#                                  measured / ideal (bench/gpu_stage1.py)
#   bash bench/gpu_check.sh 2      compute-sanitizer memcheck, racecheck, synccheck over a small
#                                  subset of the CUDA data tests (about 2-4 minutes)
#   bash bench/gpu_check.sh 3      the whole GPU test suite, then the operator benchmark tables
#                                  and the 7B/13B end-to-end tables (about 6-9 minutes)
#   bash bench/gpu_check.sh        1, 2 and 3 in order (does not fit one 10-minute command)
#
#   PYTHON=...            the interpreter (default: the image's python3)
#   VTW_SKIP_BUILD=1      reuse the build already in the tree (stages 2 and 3 skip it anyway
#                         when vtw_kernels/_C*.so exists and was built with CUDA)
#   OUT=DIR               where logs and JSON go (the device tool sets it); default build/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
OUTDIR="${OUT:-$ROOT/build/gpu_check}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
# The tree itself is the package (no pip install on the image): python/ holds vtw.
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
JOBS="$(nproc 2>/dev/null || echo 4)"

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(1 2 3)

say() { echo "==== gpu_check: $* ($(date +%T))"; }

build() {  # builds _C for the GPU present unless a CUDA build is already loaded
  if [ "${VTW_SKIP_BUILD:-0}" != 1 ] && ! "$PY" -c "import vtw_kernels as v, sys; sys.exit(0 if v.WITH_CUDA else 1)" 2>/dev/null \
     || [ "${VTW_FORCE_BUILD:-0}" = 1 ]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')"
    say "build for sm_${cap/./} with $JOBS jobs"
    t0=$SECONDS
    # build_ext --inplace: the compiled _C lands in vtw_kernels/, nothing is installed.
    # pyproject.toml's SPDX license string needs setuptools >= 77; an image with an older one
    # (which would refuse to read pyproject.toml) builds from a staging copy without it: only
    # the extension is built here, and it needs nothing from the project metadata.
    local src="$ROOT"
    if ! "$PY" -c "import setuptools, sys; sys.exit(0 if int(setuptools.__version__.split('.')[0]) >= 77 else 1)" 2>/dev/null; then
      src="$OUTDIR/build-src"
      rm -rf "$src" && mkdir -p "$src"
      cp -r "$ROOT/setup.py" "$ROOT/csrc" "$ROOT/vtw_kernels" "$src/"
      mkdir -p "$src/python" && cp -r "$ROOT/python/vtw" "$src/python/"
      echo "setuptools < 77 on this image: building from $src (no pyproject.toml)"
    fi
    (cd "$src" && VTW_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="$JOBS" "$PY" setup.py -q build_ext --inplace) \
      > "$OUTDIR/build.log" 2>&1 || { tail -n 40 "$OUTDIR/build.log"; echo "gpu_check: BUILD FAILED (build.log)"; return 1; }
    if [ "$src" != "$ROOT" ]; then cp "$src"/vtw_kernels/_C*.so "$ROOT/vtw_kernels/"; fi
    echo "build took $((SECONDS - t0)) s"
  fi
  "$PY" -c "import vtw_kernels as v; print(v.build_hint()); assert v.WITH_CUDA"
}

env_line() {
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
}

stage1() {
  say "stage 1: correctness on the device, headline figures"
  env_line
  build || return 1
  "$PY" bench/gpu_stage1.py --device cuda --out "$OUTDIR"
}

find_sanitizer() {
  for cand in "$(command -v compute-sanitizer || true)" \
              "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
              /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda/bin/compute-sanitizer \
              /usr/local/cuda-*/compute-sanitizer/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}

stage2() {
  say "stage 2: compute-sanitizer"
  build || return 1
  local san json="$OUTDIR/stage2.json" rows=()
  if ! san="$(find_sanitizer)"; then
    echo "compute-sanitizer NOT FOUND (PATH, \$CUDA_HOME/compute-sanitizer, /usr/local/cuda*/): stage 2 cannot run"
    echo '{"stage": 2, "error": "compute-sanitizer not found"}' > "$json"
    return 1
  fi
  echo "using $san"
  # Small GPU tests of the CUDA data kernels; without the caching allocator every tensor is its
  # own allocation, so memcheck sees a write past a tensor's end.
  local subset=(tests/test_cuda_data.py -m gpu -k "small and not torch" -q -x -p no:cacheprovider)
  local rc_all=0
  for tool in memcheck racecheck synccheck; do
    local t0=$SECONDS rc
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 "$san" --tool "$tool" --error-exitcode 99 --target-processes all \
      "$PY" -m pytest "${subset[@]}" > "$OUTDIR/stage2-$tool.log" 2>&1
    rc=$?
    tail -n 3 "$OUTDIR/stage2-$tool.log"
    rows+=("\"$tool\": {\"exit\": $rc, \"seconds\": $((SECONDS - t0))}")
    [ $rc -ne 0 ] && rc_all=1
  done
  (IFS=,; echo "{\"stage\": 2, \"sanitizer\": \"$san\", ${rows[*]}}") > "$json"
  echo
  echo "stage 2 summary (exit 0 = clean; 99 = errors found; 124 = timed out)"
  "$PY" -c "
import json; d = json.load(open('$json'))
for t in ('memcheck', 'racecheck', 'synccheck'):
    r = d.get(t)
    print(f'  {t:10s}', 'missing' if r is None else f\"exit {r['exit']:3d}  {r['seconds']:4d} s  {'clean' if r['exit'] == 0 else 'NOT clean'}\")"
  return $rc_all
}

stage3() {
  say "stage 3: the GPU test suite, operator benchmarks, end-to-end tables"
  build || return 1
  local t0=$SECONDS rc_tests rc_bench rc_e2e=0
  "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider --junitxml="$OUTDIR/stage3-tests.xml" \
    > "$OUTDIR/stage3-tests.log" 2>&1
  rc_tests=$?
  tail -n 15 "$OUTDIR/stage3-tests.log"
  "$PY" -m pytest bench/ --benchmark-only -k "gpu and not e2e" -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name --benchmark-json="$OUTDIR/stage3-bench.json" \
    > "$OUTDIR/stage3-bench.log" 2>&1
  rc_bench=$?
  for preset in llava-1.5-7b llava-1.5-13b; do
    "$PY" -m vtw bench --preset "$preset" --device cuda --batch 1,8,32 --repeats 3 --new-tokens 32 \
      --out "$OUTDIR/e2e-$preset" > "$OUTDIR/stage3-e2e-$preset.log" 2>&1 || rc_e2e=1
  done
  echo
  echo "stage 3 summary ($((SECONDS - t0)) s)"
  echo "  GPU tests:          $(grep -E '(passed|failed|error)' "$OUTDIR/stage3-tests.log" | tail -n1) (exit $rc_tests)"
  echo "  operator benchmarks: exit $rc_bench (tables: stage3-bench.log)"
  for preset in llava-1.5-7b llava-1.5-13b; do
    "$PY" bench/gpu_summary.py --e2e "$OUTDIR/e2e-$preset/bench.json"
  done
  [ $rc_tests -eq 0 ] && [ $rc_bench -eq 0 ] && [ $rc_e2e -eq 0 ]
}

rc=0
for s in "${stages[@]}"; do
  case "$s" in
    1|2|3) "stage$s" 2>&1 | tee "$OUTDIR/stage$s.log"; st=${PIPESTATUS[0]} ;;
    *) echo "gpu_check: no stage '$s' (1, 2 or 3)"; exit 2 ;;
  esac
  echo "gpu_check: stage $s $([ "$st" -eq 0 ] && echo passed || echo "FAILED (exit $st)")"
  [ "$st" -ne 0 ] && rc=1
done
exit $rc
