#!/usr/bin/env bash
# Checks dmruntime.tensorrt's TensorRT / CUDA calls against the real bindings, without a GPU:
# a scratch venv (build/trt-api-venv) with TensorRT's lean runtime bindings, cuda-bindings and
# the full TensorRT bindings' wheel (unpacked, not imported). See scripts/check_tensorrt_api.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/trt-api-venv
WHEELS=build/trt-api-wheels
python3.11 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q numpy cuda-bindings tensorrt-lean-cu12-bindings tensorrt-lean-cu12-libs
mkdir -p "$WHEELS"
"$VENV/bin/python" -m pip download -q --no-deps -d "$WHEELS" tensorrt-cu12-bindings
rm -rf "$WHEELS/full" && mkdir -p "$WHEELS/full"
"$VENV/bin/python" -m zipfile -e "$(ls "$WHEELS"/tensorrt_cu12_bindings-*.whl | head -1)" "$WHEELS/full"
SO=$(find "$WHEELS/full" -name 'tensorrt*.so' | head -1)
"$VENV/bin/python" scripts/check_tensorrt_api.py "$SO"
