#!/usr/bin/env bash
# The one-GPU check of the CUDA paths (needs a GPU machine; never in CI).
# Runs in the repository root with the GPU machine's own python3 and torch, in under 5 minutes on an
# H200: pass / fail for each CUDA path the CPU tests cannot reach, then tokens/s and MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-.}/gpu_check.json"
timeout 290 python3 benchmarks/gpu_check.py --layers "${LAYERS:-8}" --micro-batch "${MICRO_BATCH:-2}" | tee "$out.log"
# The JSON object is everything from the first line that opens it.
sed -n '/^{/,$p' "$out.log" > "$out"
