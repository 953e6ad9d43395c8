#!/usr/bin/env bash
# Set up (or reuse) .venv with the dev requirements, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
