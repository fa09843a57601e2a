#!/usr/bin/env bash
# Build .whl/: the wheels of bench/gpu_wheels.txt for the lent GPU machine (CPython 3.12, x86-64), which the device
# tool carries with `carry=['.whl']` and bench/gpu_check.sh installs for stage 2. Fails when the wheels and the
# working tree that travels with them exceed the 64 MiB one call may carry.
#   bash scripts/gpu_wheels.sh [--overwrite] [--python-version 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
OVERWRITE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --overwrite) OVERWRITE=1 ;;
        --python-version) PYVER=$2; shift ;;
        *) echo "gpu_wheels: unknown argument $1 (use --overwrite, --python-version X.Y)" >&2; exit 2 ;;
    esac
    shift
done
DEST=.whl
LIMIT=$((64 * 1024 * 1024))
if [ -e "$DEST" ] && [ "$OVERWRITE" -ne 1 ]; then
    echo "gpu_wheels: $DEST exists; --overwrite replaces it" >&2
    exit 2
fi
PY=$(command -v python3.11 || command -v python3)
TMP=$(mktemp -d "$PWD/.whl.tmp-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
ABI=cp${PYVER/./}
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
grep -v '^\s*#' bench/gpu_wheels.txt | sed 's/#.*//' | awk 'NF {print $1}' | while read -r spec; do
    if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
            --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$TMP" "$spec" 2> "$TMP/.err"; then
        # no wheel on PyPI: build one here, and keep it only if it is pure Python (it then runs on any CPython)
        "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$TMP/.built" "$spec" > /dev/null
        wheel=$(ls "$TMP/.built/"*.whl)
        case "$wheel" in
            *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$wheel" "$TMP/" ;;
            *) echo "gpu_wheels: $spec has no wheel for CPython $PYVER and is not pure Python" >&2; exit 1 ;;
        esac
        rm -rf "$TMP/.built"
    fi
done
rm -f "$TMP/.err"
count=$(ls "$TMP"/*.whl | wc -l)
wheels=$(du -cb "$TMP"/*.whl | tail -1 | cut -f1)
# what travels besides: tracked files and untracked ones git does not ignore (.whl/ itself is ignored)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null \
       | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheels + tree))
"$PY" -c "import sys; w, t = int(sys.argv[2]), int(sys.argv[3]); m = 2 ** 20
print(f'gpu_wheels: {sys.argv[1]} wheels, {w / m:.1f} MiB; with the working tree ({t / m:.1f} MiB): {(w + t) / m:.1f} of 64 MiB')" \
    "$count" "$wheels" "$tree"
if [ "$total" -gt "$LIMIT" ]; then
    echo "gpu_wheels: over the 64 MiB a device call carries; nothing written" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo "gpu_wheels: wrote $DEST (carry it: run(command='bash bench/gpu_check.sh', carry=['.whl'], timeout_s=540))"
