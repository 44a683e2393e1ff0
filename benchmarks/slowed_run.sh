#!/usr/bin/env bash
# The README's test command on a fresh clone of HEAD, with the machine made slower by busy
# loops: the check that no test depends on how fast the machine is.
#
#   bash benchmarks/slowed_run.sh            # LOOPS_PER_CORE=2.5 by default
#   LOOPS_PER_CORE=0 bash benchmarks/slowed_run.sh   # the same, on the machine as it is
#
# A probe (one fixed pure-Python job per core, run side by side) is timed with the machine
# quiet and again under the loops; its ratio is the slowdown actually applied, as the tests
# see it (they compete for the same cores at the same priority). The loops are stopped however
# the script ends. Everything lands in results/slowed_run/ (summary.txt, the logs).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/results/slowed_run}"
CLONE="${CLONE:-/tmp/starcoder-tp-slowed}"
LOOPS_PER_CORE="${LOOPS_PER_CORE:-2.5}"
CORES="$(nproc)"
LOOPS="$(python3 -c "print(round($LOOPS_PER_CORE * $CORES))")"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
LOOP_PIDS=()

stop_loops() {
  for pid in "${LOOP_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done
  LOOP_PIDS=()
}
trap stop_loops EXIT
trap 'stop_loops; exit 130' INT TERM

say() { echo "$*" | tee -a "$SUMMARY"; }

probe() {
  # One process per core, a fixed amount of work each; the wall time of the slowest.
  python3 - "$CORES" <<'EOF'
import multiprocessing, sys, time
def work(_):
    total = 0
    for i in range(30_000_000):
        total += i & 7
    return total
cores = int(sys.argv[1])
started = time.perf_counter()
with multiprocessing.Pool(cores) as pool:
    pool.map(work, range(cores))
print(f"{time.perf_counter() - started:.2f}")
EOF
}

: > "$SUMMARY"
say "slowed run of $(git -C "$ROOT" rev-parse --short HEAD) on $(date -u +%FT%TZ)"
say "machine: $(lscpu | sed -n 's/^Model name: *//p'), $CORES cores; busy loops: $LOOPS ($LOOPS_PER_CORE per core)"

rm -rf "$CLONE"
git clone -q "$ROOT" "$CLONE" || { say "clone failed"; exit 1; }
(cd "$CLONE" && bash setup.sh) > "$OUT/setup.log" 2>&1 || { say "setup.sh failed: see $OUT/setup.log"; exit 1; }

quiet="$(probe)"
for _ in $(seq 1 "$LOOPS"); do
  ( while :; do :; done ) &
  LOOP_PIDS+=("$!")
done
loaded="$(probe)"
say "probe: ${quiet} s quiet, ${loaded} s under the loops: $(python3 -c "print(f'{$loaded / $quiet:.2f}')")x slower"

# The README's test command, exactly (.ci/run's last line), run in the clone.
TEST_COMMAND="$(tail -n 1 "$CLONE/.ci/run")"
say "command: $TEST_COMMAND"
started=$(date +%s)
(cd "$CLONE" && eval "$TEST_COMMAND") > "$OUT/tests.log" 2>&1
rc=$?
elapsed=$(( $(date +%s) - started ))
again="$(probe)"
stop_loops
say "probe at the end, still loaded: ${again} s ($(python3 -c "print(f'{$again / $quiet:.2f}')")x)"
say "exit status $rc after ${elapsed} s"
grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/tests.log" | tee -a "$SUMMARY"
exit "$rc"
