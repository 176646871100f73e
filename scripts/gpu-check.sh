#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build ropekv, run the whole test suite with
# the thorough hypothesis profile, then the benchmark, then (--sanitize) the
# compute-sanitizer runs of scripts/sanitize.sh. Logs go to $OUT (or
# ./gpu-check-out).
# Usage: scripts/gpu-check.sh [--no-bench] [--bench-args "..."] [--sanitize] [-- pytest args]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the interpreter that has torch
BENCH=1
BENCH_ARGS="--quick"
SANITIZE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-bench) BENCH=0; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift 2 ;;
    --sanitize) SANITIZE=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
echo "== build"
export ROPEKV_CUDA_ARCHITECTURES="${ROPEKV_CUDA_ARCHITECTURES:-90-real}"
if ! "$PY" -m pip install --no-build-isolation -v . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "ropekv:|warning" "$OUT/build.log" | head -20
"$PY" -m ropekv info

echo "== tests (hypothesis profile ${ROPEKV_HYPOTHESIS_PROFILE:=thorough})"
export ROPEKV_HYPOTHESIS_PROFILE
# Run from outside the repo so the installed package is what gets imported.
(cd /tmp && "$PY" -m pytest "$OLDPWD/tests" -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" "$@") \
  >"$OUT/tests.log" 2>&1
TEST_RC=$?
grep -E "passed|failed|error" "$OUT/tests.log" | tail -5
[ $TEST_RC -eq 0 ] || { grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20; }

BENCH_RC=0
if [ $BENCH -eq 1 ]; then
  echo "== bench $BENCH_ARGS"
  "$PY" -m ropekv bench $BENCH_ARGS --out-dir "$OUT" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
  BENCH_RC=${PIPESTATUS[0]}
fi
SAN_RC=0
if [ $SANITIZE -eq 1 ]; then
  # After the benchmark, which must run alone. Five runs side by side (about 1.5
  # minutes on an H100 instead of 5 one after another): memcheck, and racecheck
  # and initcheck each over two halves of the CUDA tests.
  echo "== sanitizers"
  pids=()
  OUT="$OUT/sanitize-memcheck" bash scripts/sanitize.sh memcheck >"$OUT/sanitize-memcheck.txt" 2>&1 &
  pids+=($!)
  for tool in racecheck initcheck; do
    for half in "test_hardening" "not test_hardening"; do
      name="sanitize-$tool-${half// /-}"
      OUT="$OUT/$name" PYTEST_K_AND="$half" bash scripts/sanitize.sh "$tool" >"$OUT/$name.txt" 2>&1 &
      pids+=($!)
    done
  done
  for pid in "${pids[@]}"; do wait "$pid" || SAN_RC=1; done
  for f in "$OUT"/sanitize-*.txt; do echo "-- $(basename "$f" .txt)"; tail -2 "$f"; done
fi
echo "== summary: tests rc=$TEST_RC, bench rc=$BENCH_RC, sanitizers rc=$SAN_RC"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $SAN_RC -eq 0 ]
