#!/usr/bin/env bash
# One command on a GPU machine: build vtw for the GPU present, run the GPU tests, run
# compute-sanitizer (memcheck, racecheck) over the small GPU tests of the data-moving kernels,
# print the GPU benchmark tables of the operators, then the end-to-end tables (python -m vtw
# bench: LLaVA-1.5-7B shape at batch 1, 8 and 32, then 13B where memory allows; prefill time to
# first token and decode tokens/s with and without withdrawal, against the ideal speedup, and
# KV-cache bytes). Stops at the first failing step, naming it, with a non-zero exit status.
# Meant to finish well inside 10 minutes on one H100.
#
#   bash bench/gpu_check.sh                 (from anywhere; PYTHON=... to pick the interpreter)
#   VTW_SKIP_BUILD=1 bash bench/gpu_check.sh   (reuse an existing build)
#   VTW_BENCH_OUT=DIR                       (where the end-to-end JSON goes; default a temporary folder)
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

step "0/5 environment"
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: no NVIDIA driver here" >&2; exit 1; }
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda); assert torch.cuda.is_available(), 'torch sees no GPU'"
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')"
[[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]] || { echo "could not read the compute capability (got '$CAP')" >&2; exit 1; }

step "1/5 build for sm_${CAP/./} (TORCH_CUDA_ARCH_LIST=$CAP)"
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

step "2/5 GPU tests (pytest -m gpu tests/)"
"$PY" -m pytest -m gpu tests/ -q -x -p no:cacheprovider

step "3/5 compute-sanitizer (memcheck, racecheck) over the small GPU tests of withdraw / compact_kv_"
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
  STEP="3/5 compute-sanitizer --tool $tool"
  echo "-- $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
    "$PY" -m pytest "${SUBSET[@]}"
done

step "4/5 GPU benchmarks of the operators (pytest bench/ --benchmark-only -k 'gpu and not e2e')"
"$PY" -m pytest bench/ --benchmark-only -k "gpu and not e2e" -q -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name

step "5/5 end to end (python -m vtw bench): LLaVA-1.5-7B and -13B shapes, bfloat16, random weights"
OUT="${VTW_BENCH_OUT:-$(mktemp -d)}"
# K = L/2 (16 of 32, 20 of 40: the paper's K for 13B); 3 alternating rounds after 1 warm-up.
for preset in llava-1.5-7b llava-1.5-13b; do
  STEP="5/5 python -m vtw bench --preset $preset"
  "$PY" -m vtw bench --preset "$preset" --device cuda --batch 1,8,32 --repeats 3 --new-tokens 32 \
    --out "$OUT/$preset"
  echo
done
echo "end-to-end JSON: $OUT/*/bench.json"
STEP="5/5 targets"
"$PY" - "$OUT/llava-1.5-7b/bench.json" <<'EOF'
# The GPU targets of issue 7, read from the 7B run (printed, not enforced: a loaded or unusual
# GPU should not fail the check, but the verdict is here for bench/RESULTS.md).
import json, sys
res = json.load(open(sys.argv[1]))
rows = {r["batch"]: r for r in res["rows"] if "skipped" not in r}
def say(ok, text):
    print(("met    " if ok else "NOT met") + "  " + text)
r8, r32 = rows.get(8), rows.get(32)
if r8:
    say(r8["ratio_decoder"] >= 0.9, f"prefill at batch 8: {r8['prefill_speedup']:.2f}x measured / "
        f"{r8['ideal_decoder']:.2f}x ideal = {r8['ratio_decoder']:.2f} (target >= 0.9)")
if r32:
    say(r32["decode_speedup"] >= 1.3, f"decode at batch 32: {r32['decode_speedup']:.2f}x tokens/s (target >= 1.3x)")
    kv = r32["kv"]
    say(kv["deep_cut"] >= kv["visual_fraction_deep"] - 0.005,
        f"deep-layer KV cache at batch 32: cut {kv['deep_cut']:.1%}, visual fraction {kv['visual_fraction_deep']:.1%}")
EOF

echo
echo "gpu_check: all steps passed"
