#!/usr/bin/env bash
# Rebuild checkpoints/default from scratch: the built-in corpus, training (configs/default_novq.yaml,
# then configs/default.yaml),
# the app's gallery (the first 100 test images and their captions: embeddings, PCA layout, thumbnails,
# clips) and the evaluation report.
# CPU: uses every core. GPU: `bash scripts/reproduce_default.sh workers=4` (the GPU is picked up by
# device=auto; arguments are overrides for both training stages).
set -euo pipefail
cd "$(dirname "$0")/.."
# PY: the Python to use (default: .venv, made here on first use; PY=python3 uses an environment you have)
PY=${PY:-.venv/bin/python}
command -v "$PY" >/dev/null || { python3 -m venv .venv && .venv/bin/python -m pip install -q -r requirements.txt; }
export GRADIO_ANALYTICS_ENABLED=False MPLBACKEND=Agg
step() {  # run one step and say how long it took
    local start=$SECONDS
    "$@"
    echo "[reproduce_default] $((SECONDS - start)) s: $*"
}
step $PY -m s2i prepare synthetic --out data/synthetic-default --size default
rm -rf runs/default_novq runs/default
step $PY -m s2i train configs/default_novq.yaml "$@"   # stage 1: no VQ (ResDAVEnet-VQ's {} -> {2,3} schedule)
step $PY -m s2i train configs/default.yaml "$@"        # stage 2: adds the VQ layers, one more epoch
rm -rf checkpoints/default && mkdir -p checkpoints/default
cp runs/default/best/model.safetensors runs/default/best/config.json checkpoints/default/
step $PY -m s2i export checkpoints/default --data data/synthetic-default --split test --max-images 100 --layout pca
du -sh checkpoints/default
step $PY -m s2i evaluate default --split test --json
