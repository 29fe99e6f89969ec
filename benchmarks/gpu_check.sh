#!/usr/bin/env bash
# The prepared one-GPU check (run only where the device tool lends a GPU; never in CI).
# Runs in the repository root with the GPU machine's own python3 and torch; about 3 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-.}/gpu_check.json"
timeout 280 python3 benchmarks/gpu_check.py --layers "${LAYERS:-12}" --micro-batch "${MICRO_BATCH:-2}" | tee "$out"
