#!/usr/bin/env bash
# The GPU checks of issue #6 and of the model families, as one command for the device tool
# (one H200, torch and transformers installed, nothing fetched there). First, here:
# `bash bench/gpu_wheels.sh`; then run, with carry [".whl"] and timeout_s 590:
#
#     bash bench/gpu_run.sh
#
# It installs the carried wheels into /tmp/site, runs bench/gpu_batching.py (SD-1.5 shapes,
# fp16: one job alone, 16 concurrent jobs through the batching ModelServer, the bare pipeline
# at batch 16), bench/gpu_lm_batching.py (GPT-2-small shapes: 64 concurrent chat jobs through
# the continuously batching `transformers` server against one at a time) and then
# bench/families_speed.py, each under its own time limit, and copies
# their results and logs to $OUT (the tool brings back at most 8 files).
#
# A dry run here, on the CPU with this venv: PYTHON=.venv/bin/python BENCH_ARGS=--tiny bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    PYTHON=python3
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
read -r -a ARGS <<< "${BENCH_ARGS:-}"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
touch /tmp/gpu-run-start
timeout 270 "$PYTHON" bench/gpu_batching.py "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_batching.log"
timeout 120 "$PYTHON" bench/gpu_lm_batching.py "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_lm_batching.log"
timeout 150 "$PYTHON" bench/families_speed.py "${ARGS[@]}" 2>&1 | tee "$OUT/families_speed.log"
# The results these runs wrote (JSON; the logs hold the Markdown tables).
find bench/results -type f -name "*.json" -newer /tmp/gpu-run-start -exec cp {} "$OUT/" \;
ls -l "$OUT"
