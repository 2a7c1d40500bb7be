#!/usr/bin/env bash
# The GPU checks and benchmark in one short script, for a fresh GPU machine (a few minutes on one H100/H200):
#   bash bench/gpu.sh [OUT]        # default OUT=gpu-results; writes OUT/gpu.json, OUT/smoke.txt and the
#                                  # recorded device-cuda.json and opacus_modes.json (commit them, then python -m bench.tables)
# It uses the python that has a CUDA build of torch (PYTHON=..., default python3) and installs the project
# into it without dependencies when it is not importable yet (the machine may have no network).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__)"
"$PY" -c "import ecgtwin" 2>/dev/null || "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/smoke.txt"
"$PY" -m pytest -q tests/test_device.py -p no:cacheprovider 2>&1 | tee -a "$OUT/smoke.txt"
# --record writes bench/data/benchmarks/device-cuda.json and the CUDA modes of ecgtwin/train/opacus_modes.json;
# copies go to OUT, so that a machine whose tree is thrown away still hands them back to commit
"$PY" -m bench.gpu --device cuda --out "$OUT" --batch "${BATCH:-64}" --steps "${STEPS:-10}" --twins "${TWINS:-2048}" --compile --record
cp bench/data/benchmarks/device-cuda.json ecgtwin/train/opacus_modes.json "$OUT/"
