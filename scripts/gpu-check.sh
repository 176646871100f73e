#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build ropekv, run the whole test suite with
# the thorough hypothesis profile, then the benchmark. Logs go to $OUT (or
# ./gpu-check-out). Usage: scripts/gpu-check.sh [--no-bench] [--bench-args "..."] [-- pytest args]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the interpreter that has torch
BENCH=1
BENCH_ARGS="--quick"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-bench) BENCH=0; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift 2 ;;
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
echo "== summary: tests rc=$TEST_RC, bench rc=$BENCH_RC"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
