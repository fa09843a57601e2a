#!/usr/bin/env bash
# The functional core on the releases the lent GPU machine has (transformers 5.x, a newer torch) and without the
# MosaicML stack: a second virtualenv (.venv-compat: torch 2.13.0, transformers 5.17.0, no Composer, llm-foundry,
# streaming or omegaconf) runs the tests of masks, hooks, export, one-shot ranking, shapes and the GPU check's
# first stage (on the CPU). Not part of scripts/test.sh (CI's time budget); run it after touching those parts.
#   scripts/test_compat.sh [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_COMPAT:-.venv-compat}
PY=$(command -v python3.11 || command -v python3)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 transformers==5.17.0 \
    'safetensors>=0.4' numpy 'pytest>=8' 'pytest-timeout>=2.3'
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" -m pytest -q --timeout 900 -p no:cacheprovider \
    tests/test_masks.py tests/test_functional.py tests/test_shapes.py tests/test_oneshot.py \
    tests/test_equivalence.py tests/test_gpu_check.py -k 'not whole_check and not without_cuda' "$@"
