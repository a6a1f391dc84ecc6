#!/usr/bin/env bash
# Runs a matrix (MATRIX, default validation/matrices/h200.toml; SNAPSHOT=1 adds --snapshot) on one H200 through the harness, in under ~8 minutes of run
# time, writing results and a log under $OUT (the device tool's output folder) or ./out.
# Dry-run first on any machine:  vramplan measure validation/matrices/h200.toml --device cpu --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# bitsandbytes is not installed on the GPU machine: a wheel carried in shared/wheels/ is used if present.
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps shared/wheels/bitsandbytes-*.whl
fi
"$PY" -m pip install -q --no-deps -e . >/dev/null
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
MATRIX="${MATRIX:-validation/matrices/h200.toml}"
NAME="$(basename "$MATRIX" .toml)"
"$PY" -m vramplan measure "$MATRIX" --device cuda --out "$OUT/$NAME.jsonl" \
  --resume --timeout 120 ${SNAPSHOT:+--snapshot} 2>&1 | tee "$OUT/$NAME.log"
"$PY" -m vramplan check "$OUT/$NAME.jsonl" > "$OUT/$NAME-check.txt" 2>&1 || true
