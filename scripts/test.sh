#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, slow tests included, on CPU (what CI runs).
#   scripts/test.sh --fast [PYTEST_ARGS...]   the same without the tests marked slow (pytest -m "not slow")
# Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
markers=()
if [[ "${1:-}" == "--fast" ]]; then
    shift
    markers=(-m "not slow")
fi
bash scripts/setup.sh
export COMPOSER_SHEAR_CACHE=${COMPOSER_SHEAR_CACHE:-$PWD/.cache/composer_shear}
.venv/bin/ruff check .
.venv/bin/pytest -q --timeout 900 --durations 15 -p no:cacheprovider ${markers[@]+"${markers[@]}"} "$@"
