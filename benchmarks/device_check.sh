#!/usr/bin/env bash
# The checks for a session with an accelerator, as one short script. Each part has its own time
# limit, and a failing part is reported while the next still runs (one device session may be all
# there is):
#   1. the accelerator tests (parity with transformers, a perf case, and on CUDA the compiled
#      decode step replayed as CUDA graphs), the device layer's tests, and the perf suite's refusal
#      of devices the machine lacks (on CUDA: --device-id 64);
#   2. the perf suite as a user runs it (`pytest tests_perf --device ...`), a small grid at the
#      devices' world size: its CSV and pytest-benchmark JSON are copied under $OUT;
#   3. the accuracy suite (`pytest tests_accuracy --device ...`) on 20 HumanEval problems;
#   4. benchmarks/cuda_latency.py: parity on the embedded and bench-size models in fp32 and bf16,
#      the nccl/hccl backend at world size 1, and StarCoder-15.5B-shaped latency (8 of its 40
#      layers, full width, bf16) for transformers, ours eager and ours --compile.
#
#   bash benchmarks/device_check.sh [cuda|npu|cpu]     (cpu: to try the script itself)
#   PYTHON=python3 OUT=/some/dir bash benchmarks/device_check.sh cuda
#   WRITE=1 bash benchmarks/device_check.sh cuda         (also writes the RESULTS.md section)
#   DEADLINE_S=540 bash benchmarks/device_check.sh cuda    (the last part stops in time to write its JSON)
#   SKIP=accuracy,latency bash benchmarks/device_check.sh cuda   (parts: tests,perf,accuracy,latency)
#
# Results under $OUT/device_check: log.txt, perf.csv, perf.json, cuda_latency.json.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
case "$device" in cuda|npu|cpu) ;; *) echo "device_check: unknown device '$device' (cuda, npu or cpu)" >&2; exit 2 ;; esac
py=${PYTHON:-.venv/bin/python}
out=${OUT:-/tmp}/device_check
skip=",${SKIP:-},"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1

status=0
part() {  # part NAME LIMIT_S COMMAND...: runs unless skipped; a failure or timeout is reported
  local name=$1 limit=$2; shift 2
  if [[ "$skip" == *",$name,"* ]]; then echo "== $name: skipped (SKIP)"; return; fi
  echo "== $name ($device, at most ${limit}s) $(date -u +%H:%M:%S)"
  local started=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "== $name: exit $rc in $((SECONDS - started))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  [ $rc -eq 0 ] || status=1
}

"$py" -c "import platform, torch, transformers; print('python', platform.python_version(), '| torch', torch.__version__, '| transformers', transformers.__version__)"
[ "$device" = cuda ] && { nvidia-smi -L || true; }
world_size=$("$py" -c "
import torch, sys
kind = sys.argv[1]
n = torch.cuda.device_count() if kind == 'cuda' else (__import__('torch_npu') and torch.npu.device_count()) if kind == 'npu' else 2
print(2 if n >= 2 else 1)" "$device" 2>/dev/null || echo 1)
echo "world size for the suites: $world_size"

part tests 300 "$py" -m pytest tests/test_accelerators.py tests/test_device.py -q -rs -p no:cacheprovider \
  tests/test_perf_suite.py::test_a_device_or_allocator_the_ranks_cannot_use_stops_the_run_at_start_up

results=$(mktemp -d)
part perf 240 "$py" -m pytest tests_perf -q -p no:cacheprovider --device "$device" --world-size "$world_size" \
  --batch-sizes 1,16 --seq-in 32,1024 --seq-out 32 --perf-rounds 3 --results-dir "$results"
for f in "$results"/*.csv "$results"/*.json; do
  [ -f "$f" ] && cp "$f" "$out/perf.${f##*.}"
done

part accuracy 300 "$py" -m pytest tests_accuracy -q -rs -p no:cacheprovider --device "$device" \
  --world-size "$world_size" --humaneval-limit 20 --results-dir "$results/accuracy"

latency_limit=900
# DEADLINE_S: seconds the whole script may take (a lease's limit): the last part ends in time to write its JSON
[ -n "${DEADLINE_S:-}" ] && latency_limit=$(( DEADLINE_S - SECONDS - 20 < 900 ? DEADLINE_S - SECONDS - 20 : 900 ))
part latency "$latency_limit" "$py" benchmarks/cuda_latency.py --device "$device" --json-out "$out/cuda_latency.json" ${WRITE:+--write}
echo "== results under $out (exit $status)"
exit $status
