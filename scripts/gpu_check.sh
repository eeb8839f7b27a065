#!/usr/bin/env bash
# The GPU check (make gpu-check): every command on one GPU with a Qwen2.5-0.5B-shaped model, placement and dtypes
# asserted, tokens/s, peak memory and MFU per stage. --cpu-smoke: the same stages, tiny model, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"
