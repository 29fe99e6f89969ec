#!/usr/bin/env bash
# The one-GPU check (needs a GPU machine; never in CI): the CUDA paths the CPU tests cannot reach, and
# what argonne_dt/memory_plan.py predicts for this GPU (peak memory per checkpoint mode, step time against the
# assumed matmul efficiency, collective bandwidth with more than one GPU) and the attention kernels
# (benchmarks/gpu_attention_check.py). About 5 to 7 minutes on one H200.
# Runs in the repository root with the machine's own python3 and torch; nothing else is installed.
# Every check prints one JSON line as it finishes; they are kept in $OUT/gpu_check.jsonl as they come.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
out="${OUT:-.}/gpu_check.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Each check runs in its own process, killed at its budget (a hang in C, a CUDA sync or an NCCL
# collective, included); this timeout bounds the whole run, and the lines printed so far stay in $out.
timeout 330 python3 benchmarks/gpu_check.py --layers "${LAYERS:-4}" --micro-batch "${MICRO_BATCH:-1}" "$@" \
  | tee "$out"
# Which SDPA kernel runs at head_dim 170 and padded to 176 (training, evaluation, generation), timed.
timeout 120 python3 benchmarks/gpu_attention_check.py | tee -a "$out"
echo "results: $out"
