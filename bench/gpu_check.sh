#!/usr/bin/env bash
# Every GPU check in one script, for a GPU machine lent for a few minutes: run it once, read its logs.
#   bash bench/gpu_check.sh [LOGDIR]     # logs in LOGDIR (default runs/gpu_check); PY=python3 to use that python
# 1. the CUDA-only test (features computed on the GPU match the CPU's);
# 2. bench/train_throughput.py on the GPU for the default's preset (step time, each encoder's share, memory);
# 3. scripts/reproduce_default.sh from scratch with `workers=4` (corpus on every core, both training stages,
#    export, evaluation), each step timed; then the trained model and both stages' metrics are copied
#    to LOGDIR. LIMIT (seconds, default none) stops step 3 with SIGINT, which the trainer turns into a
#    saved checkpoint, so a time-boxed run still leaves its logs.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-runs/gpu_check}
mkdir -p "$LOG"
export PY=${PY:-.venv/bin/python} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec > >(tee -a "$LOG/gpu_check.log") 2>&1
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
$PY -m pytest -q -p no:cacheprovider -o addopts= tests/test_audio.py -k gpu
$PY bench/train_throughput.py --presets resdavenet_vq_small --steps 10 --device cuda --json "$LOG/throughput.json"
timeout -s INT "${LIMIT:-0}" bash scripts/reproduce_default.sh workers=4
echo "reproduce_default exit code $?"
for stage in default_novq default; do cp "runs/$stage/metrics.jsonl" "$LOG/metrics_$stage.jsonl"; done
cp runs/default/best/model.safetensors runs/default/best/config.json "$LOG/"
ls -la "$LOG"
