#!/usr/bin/env bash
# The one GPU check: on a machine with a CUDA GPU (the project's H200: torch 2.11 + CUDA 13.0,
# nvcc, cuSPARSELt, no network), build the extension with all cores, run the whole test suite
# (the CUDA tests included), run every GPU benchmark, and write logs + JSON to the output folder:
# $1, else $OUT, else benchmarks/results/gpu-<date>. Aimed at well under 8 minutes.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# Output (at most 8 files, the device tool's limit): suite.log (build, info, tests, benchmark
# output), tests.xml, and one JSON (plus a PNG) per benchmark.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
LOG="$OUT_DIR/suite.log"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1 CAST_EXT_EXPECT_CUDA=1
status=0
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }

step "build (MAX_JOBS=$MAX_JOBS, archs $TORCH_CUDA_ARCH_LIST)"
SECONDS=0
if ! CAST_EXT_CUDA=1 "$PY" setup.py build_ext --inplace >>"$LOG" 2>&1; then
  step "BUILD FAILED"
  tail -50 "$LOG"
  exit 1
fi
step "built in ${SECONDS}s"
"$PY" -m cast_ext info 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv >>"$LOG" 2>&1

step "tests"
timeout 240 "$PY" -m pytest tests -q -rs -x -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests.xml" >>"$LOG" 2>&1 || status=1
tail -5 "$LOG"

for bench in benchmarks/bench_*.py; do
  name="$(basename "$bench" .py)"
  step "benchmark $name"
  timeout 180 "$PY" -m "benchmarks.$name" >>"$LOG" 2>&1 || { status=1; step "$name FAILED"; }
done
step "done (status $status)"
exit "$status"
