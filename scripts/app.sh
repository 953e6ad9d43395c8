#!/usr/bin/env bash
# Set up (or reuse) .venv with the runtime requirements, then start the app on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/python app.py "$@"
