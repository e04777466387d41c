#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command and one table (under 10 minutes on one GPU):
# the CUDA-marked tests, speed70/speed85/speed90 beside the record holder, and a fine-tuning
# run from ImageNet weights. On a machine without a CUDA GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh                 # DATA=../shared/data/cifar10 by default
#   DATA=/path/to/cifar10-folder OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-gpu-check}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
mkdir -p "$OUT"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')" | tee "$OUT/table.txt"
"$PY" -m pytest -q -m cuda tests/ 2>&1 | tail -3 | tee -a "$OUT/table.txt"
if [[ -d "$DATA" ]]; then
    "$PY" benchmarks/speedrun.py --data "$DATA" --recipes speed70,speed85,speed90 --seeds 1 --baseline-seeds 0 \
        --peer --json "$OUT/speedrun.json" 2>&1 | tail -6 | tee -a "$OUT/table.txt"
    # Fine-tuning from ImageNet: 1,000 training images (100 a class), EfficientNet-Lite0 at 224 px.
    "$PY" -m cnnlab train --data "$DATA" --model efficientnet_lite0 --pretrained --train-size 1000 \
        --test-size 2000 --epochs 5 --freeze-epochs 1 --optimizer adamw --lr 1e-3 --out "$OUT/finetune" 2>&1 \
        | tail -2 | tee -a "$OUT/table.txt"
else
    echo "gpu_check: $DATA is not here: speed runs and fine-tuning skipped (set DATA to a CIFAR-10 image folder)" \
        | tee -a "$OUT/table.txt"
fi
