#!/usr/bin/env bash
# The CUDA path, checked on one GPU (falls back to a tiny CPU run without one): see bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
