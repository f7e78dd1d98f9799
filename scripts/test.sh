#!/usr/bin/env bash
# The README's test command: set up (scripts/setup.sh), then run the whole test suite.
# CUDA tests run where a GPU and the CUDA kernels are present and skip elsewhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CAST_EXT_DEMO_DEPS=1 bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q "$@"
