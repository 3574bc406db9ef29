#!/usr/bin/env bash
# Create .venv and install dmcompile + dmruntime (editable) with test extras.
# torch is pinned to 2.13.0 first: that version comes from this machine's local CPU wheel,
# any other spec pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv ${VENV_FLAGS:-} .venv  # VENV_FLAGS: e.g. --system-site-packages (docker/Dockerfile.tensorrt)
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e 'runtimes/python[openvino]' -e '.[dev,openvino,ray]'
