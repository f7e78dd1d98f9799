#!/usr/bin/env bash
# The one GPU check: on a machine with a CUDA GPU (the project's H200: torch 2.11 + CUDA 13.0,
# nvcc, cuSPARSELt, no network), build the extension with all cores, run the tests that run CUDA
# code (`-m cuda`, marked in tests/conftest.py), every GPU benchmark, a compute-sanitizer
# memcheck of every CUDA op, then the CPU-only tests (CI runs those too; here they check torch
# 2.11), and write logs + JSON to the output folder: $1, else $OUT, else
# benchmarks/results/gpu-<date>.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# On the device machine (no .git there), pass the commit: CAST_EXT_GIT_SHA=<sha> bash ...
#
# The whole run keeps to SUITE_BUDGET seconds (default 540, inside a 600 s device call): each stage gets at most its own cap and what is left of the budget, a
# stage that runs out is killed and reported, and the next one still runs. Tests run without -x
# (every failure is reported) and with a per-test timeout where pytest-timeout is installed.
#
# Output (at most 8 files, the device tool's limit): suite.log (build, info, tests, benchmark
# output, a timing line per stage), tests.xml, one JSON per benchmark and the GEMM plot.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
LOG="$OUT_DIR/suite.log"
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET:-540}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1 CAST_EXT_EXPECT_CUDA=1
status=0
START=$SECONDS
step() { echo "== $(date -u +%T) +$((SECONDS - START))s $*" | tee -a "$LOG"; }
# Seconds a stage may take: its cap, or what is left of the budget, whichever is smaller.
allow() {
  local left=$((BUDGET - (SECONDS - START)))
  echo $(($1 < left ? $1 : left))
}
# run_stage NAME CAP CMD...: runs CMD under the stage's time limit, logging its output.
run_stage() {
  local name="$1" limit
  limit="$(allow "$2")"
  shift 2
  if ((limit < 20)); then
    step "$name SKIPPED (budget spent)"
    status=1
    return
  fi
  step "$name (limit ${limit}s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if ((rc != 0)); then
    status=1
    step "$name FAILED (rc $rc$( ((rc == 124 || rc == 137)) && echo ', time limit'), $((SECONDS - t0))s)"
  else
    step "$name ok ($((SECONDS - t0))s)"
  fi
}

step "build (MAX_JOBS=$MAX_JOBS, archs $TORCH_CUDA_ARCH_LIST, budget ${BUDGET}s)"
run_stage build 300 env CAST_EXT_CUDA=1 "$PY" setup.py build_ext --inplace
if ! "$PY" -c "import cast_ext" >>"$LOG" 2>&1; then
  step "BUILD FAILED: cast_ext does not import"
  tail -60 "$LOG"
  exit 1
fi
"$PY" -m cast_ext info 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv >>"$LOG" 2>&1

timeout_flag=()
"$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 90)
run_stage tests_cuda 170 "$PY" -m pytest tests -m cuda -q -rfEs -p no:cacheprovider \
  "${timeout_flag[@]}" --durations=10 --junitxml="$OUT_DIR/tests.xml"
grep -E "[0-9]+ (passed|failed)" "$LOG" | tail -1

# Most important first: the budget may end before the last one. The GEMM benchmark writes its
# JSON after every weight shape, so a stage cut short still leaves the shapes it finished.
run_stage bench_sparse24_mask 90 "$PY" -m benchmarks.bench_sparse24_mask
run_stage bench_adams 120 "$PY" -m benchmarks.bench_adams
run_stage bench_sparse24_gemm 200 "$PY" -m benchmarks.bench_sparse24_gemm
run_stage bench_cast_step 120 "$PY" -m benchmarks.bench_cast_step

if command -v compute-sanitizer >/dev/null; then
  run_stage memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" -m benchmarks.cuda_smoke
fi
run_stage tests_cpu 150 "$PY" -m pytest tests -m "not cuda" -q -rfEs -p no:cacheprovider \
  "${timeout_flag[@]}" --durations=5
grep -E "[0-9]+ (passed|failed)" "$LOG" | tail -1
step "done (status $status)"
exit "$status"
