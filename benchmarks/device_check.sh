#!/usr/bin/env bash
# The first checks for a session with an accelerator, as one short script: the accelerator
# tests (parity with transformers, a perf case, and on CUDA the compiled decode step replayed as
# CUDA graphs), then benchmarks/cuda_latency.py: parity on the embedded and bench-size models in
# fp32 and bf16, the nccl/hccl backend at world size 1, and StarCoder-15.5B-shaped latency (8 of
# its 40 layers, full width, bf16) for transformers, ours eager and ours --compile.
#
#   bash benchmarks/device_check.sh [cuda|npu|cpu]     (cpu: to try the script itself)
#   PYTHON=python3 OUT=/some/dir bash benchmarks/device_check.sh cuda
#
#   WRITE=1 bash benchmarks/device_check.sh cuda         (also writes the RESULTS.md section)
#
# Results: $OUT/device_check/cuda_latency.json and the terminal report.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
case "$device" in cuda|npu|cpu) ;; *) echo "device_check: unknown device '$device' (cuda, npu or cpu)" >&2; exit 2 ;; esac
py=${PYTHON:-.venv/bin/python}
out=${OUT:-/tmp}/device_check
export PYTHONUNBUFFERED=1

mkdir -p "$out"
# One device session may be all there is: a failing part is reported and the next still runs.
status=0
echo "== accelerator tests ($device)"
"$py" -m pytest tests/test_accelerators.py -q -rs -p no:cacheprovider || status=1

echo "== parity, nccl/hccl at world size 1, StarCoder-15.5B-shaped latency ($device)"
# cpu: the same steps at toy size, to try the script; --write puts the section into RESULTS.md
"$py" benchmarks/cuda_latency.py --device "$device" --json-out "$out/cuda_latency.json" ${WRITE:+--write} || status=1
echo "== results under $out (exit $status)"
exit $status
