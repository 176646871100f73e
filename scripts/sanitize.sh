#!/usr/bin/env bash
# compute-sanitizer over ropekv's CUDA kernels. Builds nothing: run it where the
# package is installed (with its CUDA backend) and an NVIDIA GPU is present.
#
#   memcheck   over scripts/sanitize_inputs.py: slots >= S and < 0, positions past
#              either end of the cos/sin cache, every entry point, bf16 / fp8 /
#              paged caches, int32 / int64 indices, one exactly sized allocation per
#              tensor (and --padding red zones after each where the sanitizer has it)
#   racecheck  over the CUDA tests (a subset, see PYTEST_K below)
#   initcheck  over the same CUDA tests
#
# Usage: scripts/sanitize.sh [memcheck] [racecheck] [initcheck]   (default: all three, in that order)
# Environment:
#   OUT                 where the logs go (default ./sanitize-out): <tool>.log is the sanitizer's
#                       report, <tool>.out the program's own output
#   PYTHON              the interpreter with torch and ropekv (default python3)
#   SANITIZER           path of compute-sanitizer (default: PATH, then /usr/local/cuda)
#   SANITIZE_EXAMPLES   hypothesis examples per test under the sanitizer (default 5)
#   PYTEST_K            the pytest -k selection (default below: the native-cuda parametrizations
#                       and the CUDA-only tests, without the >2^31-element ones)
#   PYTEST_K_AND        an extra -k condition and-ed to PYTEST_K, to split one tool's run into
#                       parts that run side by side (scripts/gpu-check.sh --sanitize)
#   SANITIZE_TIMEOUT    seconds per tool (default 1500)
# At the end it prints each tool's summary line (ERROR SUMMARY; RACECHECK SUMMARY for racecheck).
# Exit status: 0 when every tool ran and reported no error, 1 otherwise, 2 when it cannot start.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT="${OUT:-$REPO/sanitize-out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python3}"
TOOLS=("$@")
[ ${#TOOLS[@]} -gt 0 ] || TOOLS=(memcheck racecheck initcheck)
EXAMPLES="${SANITIZE_EXAMPLES:-5}"
TIMEOUT="${SANITIZE_TIMEOUT:-1500}"
PYTEST_K="${PYTEST_K:-(native-cuda or cuda_streams or cuda_graph or mixed_cuda) and not over_2g}"
[ -z "${PYTEST_K_AND:-}" ] || PYTEST_K="($PYTEST_K) and ($PYTEST_K_AND)"

SAN="${SANITIZER:-}"
if [ -z "$SAN" ]; then
  for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if command -v "$c" >/dev/null 2>&1; then SAN=$(command -v "$c"); break; fi
  done
fi
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found: set SANITIZER=/path/to/compute-sanitizer"; exit 2
fi
"$SAN" --version | tail -1 | tee "$OUT/sanitizer-version.txt"
if ! "$PY" -c "import ropekv, sys; i = ropekv.info(); print(i); sys.exit(0 if i['compiled_cuda'] and i['backend_cuda'] == 'native' else 'ropekv has no CUDA backend here')" \
    >"$OUT/info.txt" 2>&1; then
  cat "$OUT/info.txt"; exit 2
fi
tail -1 "$OUT/info.txt"

# One cudaMalloc per tensor: the sanitizer then knows each tensor's bounds, and
# initcheck does not mistake memory the caching allocator reuses for initialized.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONUNBUFFERED=1
export ROPEKV_HYPOTHESIS_PROFILE=ci
export ROPEKV_SKIP_SUBPROCESS_SUITE=1  # the tests that rerun the suite in subprocesses
# A hypothesis profile with fewer examples, registered by a pytest plugin before
# the tests' conftest loads its own.
mkdir -p "$OUT/plugin"
cat >"$OUT/plugin/ropekv_sanitize_profile.py" <<EOF
from hypothesis import HealthCheck, settings
settings.register_profile("sanitize", max_examples=$EXAMPLES, deadline=None, derandomize=True,
                          print_blob=True, suppress_health_check=list(HealthCheck))
EOF
export PYTHONPATH="$OUT/plugin${PYTHONPATH:+:$PYTHONPATH}"

PADDING=()
if "$SAN" --help 2>/dev/null | grep -q -- "--padding"; then PADDING=(--padding 256); fi

declare -A RC
for tool in "${TOOLS[@]}"; do
  log="$OUT/$tool.log"
  rm -f "$log"
  common=(--tool "$tool" --error-exitcode 1 --log-file "$log" --print-limit 50)
  echo "== $tool"
  start=$SECONDS
  case "$tool" in
    memcheck)
      timeout "$TIMEOUT" "$SAN" "${common[@]}" "${PADDING[@]}" \
        "$PY" scripts/sanitize_inputs.py >"$OUT/$tool.out" 2>&1
      ;;
    racecheck|initcheck)
      # From outside the repository, so the installed package is what gets imported.
      (cd /tmp && timeout "$TIMEOUT" "$SAN" "${common[@]}" \
        "$PY" -m pytest "$REPO/tests" -q -p no:cacheprovider -p ropekv_sanitize_profile \
        --hypothesis-profile=sanitize -k "$PYTEST_K") >"$OUT/$tool.out" 2>&1
      ;;
    *)
      echo "unknown tool $tool (memcheck, racecheck, initcheck)"; RC[$tool]=2; continue ;;
  esac
  RC[$tool]=$?
  echo "   rc=${RC[$tool]} in $((SECONDS - start)) s; $(tail -1 "$OUT/$tool.out")"
done

echo "== summary"
# memcheck and initcheck end with "ERROR SUMMARY: N errors", racecheck with
# "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)".
status=0
for tool in "${TOOLS[@]}"; do
  summary=$(grep -hE "(ERROR|RACECHECK) SUMMARY" "$OUT/$tool.log" 2>/dev/null | tail -1)
  echo "$tool: rc=${RC[$tool]} ${summary:-no SUMMARY line (see $OUT/$tool.log and $OUT/$tool.out)}"
  if [ "${RC[$tool]}" != 0 ] || ! grep -qE "ERROR SUMMARY: 0 errors|\(0 errors" <<<"$summary"; then status=1; fi
done
exit $status
