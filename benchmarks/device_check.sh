#!/usr/bin/env bash
# The first checks for a session with an accelerator, as one short script: the accelerator
# tests (parity with transformers, a perf case, and on CUDA the compiled decode step replayed as
# CUDA graphs), then eager against --compile on the bench-size model at world size 1, one run
# after the other on the same device (on CUDA, --compile is the CUDA-graph decode step).
#
#   bash benchmarks/device_check.sh [cuda|npu|cpu]     (cpu: to try the script itself)
#   PYTHON=python3 OUT=/some/dir bash benchmarks/device_check.sh cuda
#
# Results: the bench CSVs under $OUT/device_check/{eager,compiled}/ and the terminal tables.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
case "$device" in cuda|npu|cpu) ;; *) echo "device_check: unknown device '$device' (cuda, npu or cpu)" >&2; exit 2 ;; esac
py=${PYTHON:-.venv/bin/python}
out=${OUT:-/tmp}/device_check
export PYTHONUNBUFFERED=1

echo "== accelerator tests ($device)"
"$py" -m pytest tests/test_accelerators.py -q -rs -p no:cacheprovider

echo "== bench-size model: eager and --compile, world size 1, $device"
bench_dir=$("$py" -c "from starcoder_tp.testing.build_models import build_bench; print(build_bench())")
for mode in eager compiled; do
    extra=()
    if [ "$mode" = compiled ]; then extra=(--compile); fi
    "$py" -m starcoder_tp bench --device "$device" --world-size 1 --model-dir "$bench_dir" \
        --multicase 1 --batch-sizes "${BATCH_SIZES:-1,16}" --seq-in 128 --seq-out 32 --perf-rounds 3 \
        --results-dir "$out/$mode" "${extra[@]}"
done
echo "== results under $out"
