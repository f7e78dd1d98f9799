#!/usr/bin/env bash
# The README's main command: set up (scripts/setup.sh with the demo's dependencies), then run
# the CAST demo. Arguments go to `python -m cast_ext demo` (default preset: gpu if a GPU is
# visible, else cpu; `--preset smoke` is the 1-minute check).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CAST_EXT_DEMO_DEPS=1 bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m cast_ext demo "$@"
