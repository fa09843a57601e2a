#!/usr/bin/env bash
# The GPU check in one command, sized for one call of the lent GPU machine (~8 minutes, an 80 GB card):
#   stage 1  bench/gpu_stage1.py  torch + transformers only (always runs)
#   stage 2  bench/gpu_check.py   Composer, llm-foundry, streaming: installed from .whl/ (scripts/gpu_wheels.sh)
#                                 when that folder is there; one row saying why when they do not import
# Every row lands in $OUT/gpu_check.md (and .jsonl) as it is measured, so a timeout keeps what was done; each stage's
# console output is in $OUT/stage{1,2}.log. Exit status: 1 when a check failed.
#   device tool: run(command='bash bench/gpu_check.sh', carry=['.whl'], timeout_s=540)
#   any CUDA machine with the README's setup:  OUT=gpu_check_out PYTHON=.venv/bin/python bash bench/gpu_check.sh
#   a dry run on the CPU (tiny models; arguments go to both stages):  bash bench/gpu_check.sh --cpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
STAGE1_S=${STAGE1_S:-220}
STAGE2_S=${STAGE2_S:-260}
WORK=${WORK:-$PWD/.gpu_check}  # the installed wheels and stage 2's checkpoints and exports (git ignores it)
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
STACK_PATH=  # stage 2 only: the wheels hold the pinned transformers, which stage 1 must not see
if compgen -G '.whl/*.whl' > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            .whl/*.whl > "$OUT/wheels.log" 2>&1; then
        STACK_PATH=:$WORK/site
    else
        echo "gpu_check: the carried wheels did not install (see $OUT/wheels.log)"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
status=0
timeout "$STAGE1_S" "$PY" bench/gpu_stage1.py --out "$OUT" "$@" 2>&1 | tee "$OUT/stage1.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 124 ] && echo "gpu_check: stage 1 stopped at its ${STAGE1_S} s limit"
[ "$rc" -ne 0 ] && status=1
PYTHONPATH="$PYTHONPATH$STACK_PATH" timeout "$STAGE2_S" "$PY" bench/gpu_check.py --out "$WORK/stage2" --table "$OUT" "$@" 2>&1 | tee "$OUT/stage2.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 124 ] && echo "gpu_check: stage 2 stopped at its ${STAGE2_S} s limit"
[ "$rc" -ne 0 ] && status=1
echo "gpu_check: table in $OUT/gpu_check.md"
exit $status
