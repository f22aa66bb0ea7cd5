#!/usr/bin/env bash
# The GPU check: each backend's training and evaluation throughput (R50x1,
# 224 px, bf16, batch 128) against timm with AMP and channels-last in the
# same run, model FLOP utilisation, peak GPU memory, and a short fine-tuning
# in each backend on a generated image folder; one JSON file. Needs one
# NVIDIA GPU and the frameworks installed (a missing one is skipped, and
# the JSON says why); no network. Its measurements stop at a time limit
# (gpu_check.SIZES: total_s), leaving what they measured.
#
#   benchmarks/gpu_check.sh [--out gpu_check.json] [--backends pytorch,jax,tf2]
#   benchmarks/gpu_check.sh --cpu --out /tmp/check.json   # tiny, on the CPU
#
# Python: $PYTHON, else the repository's .venv, else python3 on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=$(command -v python3 || command -v python)
  fi
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
