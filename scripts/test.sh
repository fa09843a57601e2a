#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, slow tests included, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export COMPOSER_SHEAR_CACHE=${COMPOSER_SHEAR_CACHE:-$PWD/.cache/composer_shear}
.venv/bin/ruff check .
.venv/bin/pytest -q --timeout 900 -p no:cacheprovider "$@"
