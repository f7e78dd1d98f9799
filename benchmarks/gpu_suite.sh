#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU (the project's H200: torch 2.11 + CUDA 13.0, nvcc,
# cuSPARSELt, no network), build the extension with all cores for this GPU's architecture
# (TORCH_CUDA_ARCH_LIST, when unset: the first GPU's compute capability from nvidia-smi, +PTX;
# 8.0;9.0+PTX where nvidia-smi cannot tell), then run the stages of a part and write logs + JSON
# to the output folder: $2, else $OUT, else benchmarks/results/gpu-<date>.
#
#   bash benchmarks/gpu_suite.sh core|bench|verify|all [OUT_DIR]
#
# core:  the tests that run CUDA code (`-m cuda`, marked in tests/conftest.py), the mask and
#        AdamS benchmarks, the probe of cuSPARSELt float16 faults (benchmarks/cslt_fp16_probe.py),
#        a compute-sanitizer memcheck of every CUDA op
#        (benchmarks/cuda_smoke.py, caching allocator off so an overrun cannot hide inside a
#        pooled block);
# bench: the distillation loss benchmark, the CAST step benchmark and the MoE experts benchmark
#        (short), then the GEMM benchmark (every LLaMA shape and M), which gets what is left of
#        the budget and writes its JSON after every weight shape;
# verify: what the open issues still need measured, in one call that leaves the rest of a
#        15-minute device session to the demo's GPU preset (benchmarks/gpu_demo.sh): the mask
#        benchmark, the GEMM benchmark (cap 120 s), the CAST step benchmark (no profile), then
#        the CUDA tests with what is left (a slow or hung test cannot starve the benchmarks);
# all:   core and bench (a machine without the device tool's 10-minute call limit).
# The device tool runs `core`, then `bench` in a second call started at once (a machine stays
# warm for 30 s): the build is kept between calls, and a stamp of the sources' hash lets the
# second call skip it. A fresh machine builds again. The CPU-only tests are not run here: CI runs
# them, and scripts/check_cxx17.py compiles the sources as torch 2.11 does.
#
# On the device machine (no .git there), pass the commit: CAST_EXT_GIT_SHA=<sha> bash ...
#
# Each call keeps to SUITE_BUDGET whole seconds (default: core 450, bench 270, all 540; a value
# that is not a number stops the script before anything runs): each stage gets at most its own
# cap and what is left of the budget; a stage that runs out is stopped (SIGINT first, so pytest
# writes its report and a benchmark its JSON; SIGKILL 15 s later) and reported, the next one
# still runs, and stages the budget never reached are listed as skipped (and fail the call).
# Every benchmark writes its JSON as it goes, so one stopped at its limit keeps what it measured.
# Python steps outside the stages (imports, checks) have a 60 s limit each: a hung CUDA start
# cannot eat the call.
# The device tool's 15 minutes count the machine's start (1-2 min) too, so the two calls do not
# both get 540: run core with SUITE_BUDGET=450, then bench with SUITE_BUDGET = the status'
# budget_left_s - 60 (about 300).
# core's caps after the build: tests 160 + mask 45 + AdamS 60 + fp16 probe 90 + memcheck 60
# (cast_ext's kernels) + 60 (the cuSPARSELt GEMM) = 475 s. The build took 54-71 s on the H200
# (one arch, 16 cores) and the CUDA tests 60 s in 14 xdist workers, so in 450 the stages that
# finish early leave the memcheck most of its caps; a stage the budget cuts short is reported.
# bench's caps: distill 45 + CAST step 90 + experts 60 before the GEMM benchmark (cap 240),
# which takes the rest: at least about 105 s of 300 when the build is kept, more when the short
# stages finish early.
# Tests run without -x (every failure is reported), kernel tests first and the slow subprocess
# tests (resume in a fresh process, the demo, the FSDP2 example) last, with a per-test timeout
# where pytest-timeout is installed, in 8 pytest-xdist workers where it is installed: a test that
# crashes its process, or leaves a CUDA fault (sticky: tests/conftest.py's _cuda_context_kept
# then ends the worker), costs one worker, which is replaced, not the rest of the stage. The exit status is 1 if a stage failed or the budget
# skipped one (a memcheck this machine cannot run is skipped without failing the call).
#
# Output (at most 8 files per call, the device tool's limit): suite.log (build, info, tests,
# benchmark output, a timing line per stage, the issues' targets checked by
# benchmarks/targets.py), tests.xml, one JSON per benchmark, the GEMM plot.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART="${1:-}"
case "$PART" in
  core | bench | verify | all) ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh core|bench|verify|all [OUT_DIR]" >&2
    exit 2
    ;;
esac
OUT_DIR="${2:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
LOG="$OUT_DIR/suite.log"
PY="${PYTHON:-python3}"
case "$PART" in
  core) BUDGET="${SUITE_BUDGET:-450}" ;;
  bench) BUDGET="${SUITE_BUDGET:-270}" ;;
  verify) BUDGET="${SUITE_BUDGET:-330}" ;;
  *) BUDGET="${SUITE_BUDGET:-540}" ;;
esac
# The stages of each part, run in the order of the code below.
case "$PART" in
  core) STAGES="tests mask adams probe memcheck" ;;
  bench) STAGES="distill cast_step experts gemm" ;;
  verify) STAGES="tests mask cast_step gemm" ;;
  *) STAGES="tests mask adams probe memcheck distill cast_step experts gemm" ;;
esac
wants() { [[ " $STAGES " == *" $1 "* ]]; }
BUDGET="${BUDGET%%.*}" # 287.4 -> 287
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  echo "gpu_suite.sh: SUITE_BUDGET must be whole seconds, got '${SUITE_BUDGET:-}'" >&2
  exit 2
fi
BUDGET=$((10#$BUDGET)) # 0450 is 450 (not octal)
# shellcheck source=benchmarks/gpu_build.sh
source benchmarks/gpu_build.sh  # CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, the stamp, py60
export PYTHONUNBUFFERED=1 CAST_EXT_EXPECT_CUDA=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # no network there: fail at once, not after retries
status=0
skipped=()
START=$SECONDS
step() { echo "== $(date -u +%T) +$((SECONDS - START))s $*" | tee -a "$LOG"; }
# Seconds a stage may take: its cap, or what is left of the budget, whichever is smaller.
allow() {
  local left=$((BUDGET - (SECONDS - START)))
  echo $(($1 < left ? $1 : left))
}
# run_stage NAME CAP CMD...: runs CMD under the stage's time limit, logging its output; returns
# 0 when it succeeded, 1 when it failed or was skipped.
run_stage() {
  local name="$1" limit
  limit="$(allow "$2")"
  shift 2
  if ((limit < 20)); then
    step "$name SKIPPED (budget spent)"
    skipped+=("$name")
    status=1
    return 1
  fi
  step "$name (limit ${limit}s)"
  local t0=$SECONDS rc=0
  timeout -s INT --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if ((rc != 0)); then
    status=1
    step "$name FAILED (rc $rc$( ((rc == 124 || rc == 137)) && echo ', time limit'), $((SECONDS - t0))s)"
    return 1
  fi
  step "$name ok ($((SECONDS - t0))s)"
}

step "part $PART: build (MAX_JOBS=$MAX_JOBS, archs $TORCH_CUDA_ARCH_LIST, budget ${BUDGET}s)"
"$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -1 | tee -a "$LOG"
# A later call on the same (warm) machine skips the build (gpu_build.sh's stamp; gpu_demo.sh
# stamps its builds too).
if gpu_build_current; then
  step "build: up to date (sources $SOURCES_HASH built by an earlier call)"
else
  run_stage build 300 env CAST_EXT_CUDA=1 "$PY" setup.py build_ext --inplace && gpu_build_stamp
fi
if ! py60 -c "import cast_ext" >>"$LOG" 2>&1; then
  step "BUILD FAILED: cast_ext does not import"
  tail -60 "$LOG"
  exit 1
fi
py60 -m cast_ext info 2>&1 | tee -a "$LOG"
timeout 30 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv >>"$LOG" 2>&1
# Without a visible GPU every CUDA test skips and every stage would read "ok": stop instead
# (SUITE_ALLOW_NO_GPU=1 runs the script's own flow on a CPU machine).
if [[ "${SUITE_ALLOW_NO_GPU:-0}" != 1 ]] &&
  ! py60 -c "import sys, torch, cast_ext; sys.exit(not (torch.cuda.is_available() and cast_ext.cuda_kernels_available()))" >>"$LOG" 2>&1; then
  step "NO GPU: torch sees no CUDA device, or cast_ext has no CUDA kernels; nothing run"
  tail -30 "$LOG"
  exit 1
fi
# Built without cuSPARSELt (its header not found), the GEMM tests skip and its benchmark says
# "skipped": the run goes on, but fails, so that this cannot pass for a full one.
if [[ "${SUITE_ALLOW_NO_GPU:-0}" != 1 ]] &&
  ! py60 -c "import sys, cast_ext; sys.exit(not cast_ext.cusparselt_available())" >>"$LOG" 2>&1; then
  status=1
  step "cuSPARSELt NOT BUILT: the sparse GEMM tests and benchmark cannot run (see the build log)"
fi

# The CUDA tests: first in core and all; last in verify, after the benchmarks the open issues
# still need measured, which a slow or hung test must not starve.
tests_stage() {
  timeout_flag=() xdist_flag=()
  py60 -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 60)
  py60 -c "import xdist" 2>/dev/null && xdist_flag=(-n 8 --max-worker-restart 16)
  # The kernels' tests first (cuSPARSELt's among them), the slow subprocess tests last.
  first=(masks adams distill sparse24_gemm nn optim hostile determinism memory cupy)
  last=(resume demo_gpu_path examples)
  files=()
  for f in "${first[@]}"; do files+=("tests/test_$f.py"); done
  for f in tests/test_*.py; do
    n="${f#tests/test_}"
    [[ " ${first[*]} ${last[*]} " == *" ${n%.py} "* ]] || files+=("$f")
  done
  for f in "${last[@]}"; do files+=("tests/test_$f.py"); done
  # -v: a test per line, so a stage stopped at its limit shows where it was
  run_stage tests_cuda 160 "$PY" -m pytest "${files[@]}" -m cuda -v -rfEs -p no:cacheprovider \
    "${timeout_flag[@]}" "${xdist_flag[@]}" --durations=10 --junitxml="$OUT_DIR/tests.xml"
  grep -E "[0-9]+ (passed|failed)" "$LOG" | tail -1
}
if wants tests && [[ $PART != verify ]]; then tests_stage; fi
# The issues' benchmarks before the memcheck: on a first call the build leaves the least time
# for the last stage.
wants mask && run_stage bench_sparse24_mask 45 "$PY" -m benchmarks.bench_sparse24_mask
# The GEMM benchmark under cap $1 (it writes its JSON after every weight shape).
gemm_stage() { wants gemm && run_stage bench_sparse24_gemm "$1" "$PY" -m benchmarks.bench_sparse24_gemm; }
# verify: the GEMM benchmark (issue 5's targets) next, before the CAST step's reported rows
[[ $PART == verify ]] && gemm_stage 120
wants adams && run_stage bench_adams 60 "$PY" -m benchmarks.bench_adams
# Which float16 cuSPARSELt calls fault the GPU (refused on sm_90 with cuSPARSELt <= 0.8.0 since
# the H200 run of 2026-11-30), one case per process.
wants probe && run_stage cslt_fp16_probe 90 "$PY" -m benchmarks.cslt_fp16_probe
if wants memcheck; then
  SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
  if [[ -x $SANITIZER ]]; then
    before=$status lines=$(wc -l <"$LOG")
    # cast_ext's kernels, then the cuSPARSELt GEMM (its large kernels instrument slowly) last
    for part in kernels cslt; do
      run_stage "memcheck_$part" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 CAST_EXT_CSLT_SEARCH=0 \
        "$SANITIZER" --tool memcheck --error-exitcode 3 "$PY" -m benchmarks.cuda_smoke --part "$part"
      # The gVisor runtime refuses compute-sanitizer ("Device not supported", device tool's
      # KINDS.md): that machine cannot run the stage, which is no failure of the code.
      if tail -n +"$((lines + 1))" "$LOG" | grep -q "Device not supported"; then
        status=$before
        step "memcheck SKIPPED (compute-sanitizer: device not supported on this runtime)"
        skipped+=(memcheck)
        break
      fi
    done
  else
    step "memcheck SKIPPED (no compute-sanitizer)"
    skipped+=(memcheck)
  fi
fi
# The short stages first; the GEMM benchmark last, with what is left of the budget: it writes its
# JSON after every weight shape, so a stage cut short still leaves the shapes it finished.
wants distill && run_stage bench_distill 45 "$PY" -m benchmarks.bench_distill
# (--profile: torch.profiler's table of a step, a file of its own; not in verify, whose call
# leaves its time to the demo)
profile=(--profile)
[[ $PART == verify ]] && profile=()
wants cast_step && run_stage bench_cast_step 90 "$PY" -m benchmarks.bench_cast_step "${profile[@]}"
wants experts && run_stage bench_experts 60 "$PY" -m benchmarks.bench_experts
[[ $PART != verify ]] && gemm_stage 240
if wants tests && [[ $PART == verify ]]; then tests_stage; fi
# The issues' speed targets against every result in the folder (this call's and an earlier
# call's into the same folder): met, NOT met or not measured, a table to paste into a report.
py60 -m benchmarks.targets "$OUT_DIR" 2>&1 | tee -a "$LOG"
step "done (part $PART, status $status${skipped[*]:+, skipped: ${skipped[*]}})"
exit "$status"
