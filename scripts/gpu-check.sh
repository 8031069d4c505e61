#!/usr/bin/env bash
# Checks and measures tokenmill on a GPU machine in one command (see scripts/gpu_check.py for what):
#
#   scripts/gpu-check.sh BIN SMOLLM2_GGUF OUT_DIR [gpu_check.py flags...]
#
# BIN is a tokenmill built with `--features cuda` (../shared/gpu/README.md); the GPU machine
# needs Python with torch and transformers (it has them). Writes OUT_DIR/gpu-check.json,
# OUT_DIR/gpu-check.md, the bench JSON and plots, and every server log.
# `scripts/gpu-check.sh target/debug/tokenmill smollm2 /tmp/gpu-check --dry-run-cpu` runs the same
# steps on the CPU with tiny shapes, to test the script where there is no GPU.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,10p' "$0"
    exit 2
fi
bin=$1 smollm2=$2 out=$3
shift 3
exec python3 "$(dirname "$0")/gpu_check.py" --bin "$bin" --smollm2 "$smollm2" --out "$out" "$@"
