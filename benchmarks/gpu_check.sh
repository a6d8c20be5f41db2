#!/usr/bin/env bash
# One-shot check on a GPU machine (H100/H200 class; torch, Triton and pytest preinstalled, no
# package registry, SpikingJelly possibly absent). About 6 minutes: each step runs under its own
# time limit, in order of value, and the whole script under a budget (BINSLT_GPU_BUDGET_S,
# default 370 s) that clips the later limits:
#
#   step     limit  what
#   machine    15   nvidia-smi, python / torch / triton / spikingjelly versions (carried wheels
#                   from .whl/, made by benchmarks/gpu_wheels.sh, are installed first)
#   build     140   skipped when `import binslt._C, binslt._C_cuda` works from the tree (after
#                   copying in .prebuilt/, made here by benchmarks/gpu_prebuild.sh for the
#                   device's Python/torch, where its source hash matches the tree's);
#                   otherwise pip install -e . --no-build-isolation --no-deps with
#                   MAX_JOBS=$(nproc) and TORCH_CUDA_ARCH_LIST = this device's capability only
#   check      20   python -m binslt check --device cuda --json check.json ("not available"
#                   where the command does not exist)
#   tests      75   pytest -m "gpu and not slow" over the Triton and CUDA test files, most
#                   valuable first, -rfE --maxfail=3, junit XML; BINSLT_TRITON_AUTOTUNE=first
#                   (one autotune configuration per kernel). Stopped by SIGINT at its limit, so
#                   pytest still prints its summary and writes the XML
#   bench      45   benchmarks/conv_lif.py --device cuda --sets gpu_ref (the reference layer;
#                   --no-sj, binslt alone, where SpikingJelly is not importable)
#   network    35   benchmarks/network.py --device cuda --quick --batch 32 (Conv-4; skipped
#                   where SpikingJelly is not importable)
#   ddp        40   tests/test_gpu_ddp.py: torchrun with nccl, the short case
#
# After every step the results folder (logs, junit XML, CSVs, check.json) is archived into
# DEST/gpu_check.tgz (written to a temporary name, then renamed: never half-written) and
# DEST/summary.txt lists every step's status, the one running and the time used. A run cut
# short (the device call's own limit, SIGKILL) still returns every finished step; on SIGTERM /
# SIGINT the running step is stopped and its partial log archived too. The benchmark CSVs are
# written row by row, so a step stopped at its limit keeps the rows it measured.
#
# The device call (from the repository root; 370 s of script, twice within 15 minutes):
#   run(command="bash benchmarks/gpu_check.sh \"$OUT\"", carry=[".whl", ".prebuilt"],
#       timeout_s=400)
# (".whl" after `bash benchmarks/gpu_wheels.sh`, for SpikingJelly; ".prebuilt" after
# `PYTHON=<python 3.12 with torch 2.11> bash benchmarks/gpu_prebuild.sh`.) Then
#   tar xzf <files_at>/gpu_check.tgz    # gpu_check/*.log, *.xml, *.csv, check.json
# and commit the CSVs under benchmarks/results/ (their names carry the device).
#
# Usage:  bash benchmarks/gpu_check.sh [--dry-run] [DEST]
#   DEST (or BINSLT_GPU_OUT) receives gpu_check.tgz and summary.txt; default
#   ${TMPDIR:-/tmp}/binslt_gpu_check. The results are gathered in BINSLT_RESULTS (default a new
#   temporary folder named gpu_check), outside DEST.
#   --dry-run (or BINSLT_GPU_DRY_RUN=1): on a machine without a GPU, every step runs a small
#   CPU stand-in (no build: the carried extension is imported; tests: the same selection, which
#   the CPU skips; benchmarks: one tiny CPU shape) with the same limits, archive and summary.
#   BINSLT_SKIP_BUILD=1 skips the build step (use the installed build).
#   BINSLT_SJ_PATH=DIR is prepended to PYTHONPATH (a SpikingJelly 2.0 source tree).
#   BINSLT_GPU_BUDGET_S (default 370) is the time budget of the whole script.
#   BINSLT_GPU_BENCH_AUTOTUNE (default first: the tests' compiled kernels are reused; "all"
#   autotunes, which needs a longer limit) is BINSLT_TRITON_AUTOTUNE for the benchmark steps.
#   PYTHON picks the interpreter.
#
# A failing step does not stop the others. The exit code is non-zero if any step failed, timed
# out or was skipped for lack of time.
set -u

cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY="${BINSLT_GPU_DRY_RUN:-0}"
DEST=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a (see --help)" >&2; exit 2 ;;
    *) if [ -n "$DEST" ]; then echo "gpu_check.sh: one DEST folder only" >&2; exit 2; fi
       DEST=$a ;;
  esac
done
case "$DRY" in 0|1) ;; *) echo "gpu_check.sh: BINSLT_GPU_DRY_RUN must be 0 or 1" >&2; exit 2 ;; esac
DEST="${DEST:-${BINSLT_GPU_OUT:-${TMPDIR:-/tmp}/binslt_gpu_check}}"
mkdir -p "$DEST" || exit 2
DEST=$(cd "$DEST" && pwd)
if [ -n "${BINSLT_RESULTS:-}" ]; then
  RES=$BINSLT_RESULTS
else
  RES="$(mktemp -d "${TMPDIR:-/tmp}/binslt_gpu_check.XXXXXX")/gpu_check"
fi
mkdir -p "$RES" || exit 2
RES=$(cd "$RES" && pwd)
case "$RES/" in "$DEST"/*) echo "gpu_check.sh: the results folder must lie outside DEST" >&2
  exit 2 ;; esac
BUDGET="${BINSLT_GPU_BUDGET_S:-370}"
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: BINSLT_GPU_BUDGET_S must be whole seconds" >&2
  exit 2 ;; esac

export PY="${PYTHON:-python}" RES DRY ROOT
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${BINSLT_SJ_PATH:-}" ]; then export PYTHONPATH="$BINSLT_SJ_PATH:$PYTHONPATH"; fi
export SJ_LIF_CUDA_IMPLEMENTATION="${SJ_LIF_CUDA_IMPLEMENTATION:-triton}"
START=$SECONDS
STARTED=$(date -u +%FT%TZ)
LOG="$RES/gpu_check.log"
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

declare -a NAMES=() STATUS=()
FAILED=0
CURRENT=""
CUR_LIMIT=0
CUR_T0=0
CHILD=""

# summary.txt: every finished step, the running one, the time used; written atomically.
summary() {
  local tail_line=$1
  {
    echo "binslt gpu_check$([ "$DRY" = 1 ] && echo ' (dry run)') started $STARTED," \
         "$(( SECONDS - START ))s of ${BUDGET}s used, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    for i in "${!NAMES[@]}"; do printf '  %-8s %s\n' "${NAMES[$i]}" "${STATUS[$i]}"; done
    if [ -n "$CURRENT" ]; then
      printf '  %-8s RUNNING for %ss (limit %ss)\n' "$CURRENT" "$(( SECONDS - CUR_T0 ))" "$CUR_LIMIT"
    fi
    echo "$tail_line"
  } > "$DEST/.summary.txt.tmp" && cp "$DEST/.summary.txt.tmp" "$RES/summary.txt" \
    && mv -f "$DEST/.summary.txt.tmp" "$DEST/summary.txt"
}

# gpu_check.tgz: the whole results folder, renamed into place only once complete.
archive() {
  tar czf "$DEST/.gpu_check.tgz.tmp" -C "$(dirname "$RES")" "$(basename "$RES")" \
    && mv -f "$DEST/.gpu_check.tgz.tmp" "$DEST/gpu_check.tgz"
}

record() {  # record NAME STATUS
  NAMES+=("$1"); STATUS+=("$2")
  say "== $1: $2"
}

on_signal() {
  trap - TERM INT HUP
  if [ -n "$CHILD" ]; then  # the step's `timeout` passes SIGINT on to its command
    kill -INT "$CHILD" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
    # `timeout` leads its own process group: whatever is left of the step goes with it
    kill -KILL -- "-$CHILD" 2>/dev/null || kill -KILL "$CHILD" 2>/dev/null
  fi
  if [ -n "$CURRENT" ]; then
    record "$CURRENT" "KILLED by a signal after $(( SECONDS - CUR_T0 ))s (partial log)"
    CURRENT=""
  fi
  summary "stopped by a signal; later steps not run"
  archive
  exit 143
}
trap on_signal TERM INT HUP

# step NAME LIMIT_S LOGFILE CMD...: CMD (a program or an exported function) under `timeout`,
# its output in LOGFILE; the last lines echoed; then summary and archive.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local avail=$(( BUDGET - (SECONDS - START) ))
  if [ "$avail" -lt 5 ]; then
    FAILED=1
    record "$name" "SKIPPED (time budget spent, ${avail}s left)"
    summary "running"; archive
    return
  fi
  if [ "$limit" -gt "$avail" ]; then limit=$avail; fi
  local sig=TERM
  if [ "$name" = tests ] || [ "$name" = ddp ]; then sig=INT; fi  # pytest: summary + junit XML
  if declare -F "$1" >/dev/null; then set -- bash -c "$1"; fi
  CURRENT=$name; CUR_LIMIT=$limit; CUR_T0=$SECONDS
  say "== $name (limit ${limit}s) $(date -u +%H:%M:%S): $*"
  summary "running"
  rm -f "$RES/.note"
  timeout -s "$sig" --kill-after=8 "$limit" "$@" > "$RES/$log" 2>&1 < /dev/null &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  local dt=$(( SECONDS - CUR_T0 )) note=""
  if [ -s "$RES/.note" ]; then note=": $(head -c 300 "$RES/.note")"; fi
  rm -f "$RES/.note"
  CURRENT=""
  tail -n 12 "$RES/$log" | cut -c1-220
  case "$rc" in
    0) record "$name" "ok (${dt}s)$note" ;;
    124|137) FAILED=1; record "$name" "TIMEOUT after ${dt}s (log: $log)$note" ;;
    200) record "$name" "not available (${dt}s, log: $log)$note" ;;
    5) FAILED=1; record "$name" "FAILED: pytest selected no tests (log: $log)" ;;
    *) FAILED=1; record "$name" "FAILED rc=$rc after ${dt}s (log: $log)$note" ;;
  esac
  summary "running"
  archive
}

# A step function may write one line to $RES/.note; it is appended to the step's status.
note() { echo "$*" > "$RES/.note"; echo "note: $*"; }

machine() {
  if [ "$DRY" = 1 ]; then echo "dry run: no GPU needed"; fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 \
    || echo "nvidia-smi not available"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || true
  git -C "$ROOT" status --short 2>/dev/null | head -20
  "$PY" - <<'EOF'
import importlib, os, platform
from importlib import metadata
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda",
      torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0),
      "| capability", torch.cuda.is_available() and torch.cuda.get_device_capability(0))
for mod in ("triton", "spikingjelly"):  # imported: a source tree on PYTHONPATH counts too
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "(no __version__)"))
    except Exception as exc:
        print(mod, "NOT IMPORTABLE:", exc)
for dist in ("numpy", "scikit-learn", "matplotlib", "pytest", "hypothesis", "safetensors"):
    try:
        print(dist, metadata.version(dist))
    except metadata.PackageNotFoundError:
        print(dist, "NOT INSTALLED")
if not torch.cuda.is_available() and os.environ.get("DRY") != "1":
    raise SystemExit("no CUDA device visible to torch")
EOF
}

build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run (unless binslt._C and binslt._C_cuda import from the tree):"
    echo "  MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=<this GPU's capability> BINSLT_CUDA=1" \
         "$PY -m pip install -e . --no-build-isolation --no-deps -v"
    "$PY" -c "import binslt._C; print('binslt._C imports from', binslt._C.__file__)" || return 1
    note "dry run: not built; the CPU extension imports"
    return 0
  fi
  # Extensions built here for this Python/torch (benchmarks/gpu_prebuild.sh), carried in
  # .prebuilt/: used only when they were built from these very sources.
  if compgen -G ".prebuilt/*.so" >/dev/null; then
    local want have
    want=$(bash benchmarks/gpu_sources_hash.sh)
    have=$(cat .prebuilt/SOURCES.sha256 2>/dev/null || true)
    if [ "$want" = "$have" ]; then
      cp .prebuilt/*.so binslt/ && echo "copied the carried .prebuilt/ extensions into binslt/"
    else
      echo "the carried .prebuilt/ extensions were built from other sources; not used"
    fi
  fi
  if "$PY" -c "import binslt._C, binslt._C_cuda; print(binslt._C.__file__, binslt._C_cuda.__file__)"; then
    note "the carried extensions import; not rebuilt"
    return 0
  fi
  local nvcc_path cap
  nvcc_path=$(command -v nvcc || true)
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -z "$nvcc_path" ] && [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then nvcc_path="$d/bin/nvcc"; fi
  done
  if [ -n "$nvcc_path" ]; then
    export BINSLT_CUDA=1
    export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}"
    echo "nvcc: $nvcc_path, CUDA_HOME=$CUDA_HOME, BINSLT_CUDA=1"
  else
    echo "nvcc not found: BINSLT_CUDA left unset (the build decides; no binslt._C_cuda)"
  fi
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "$PY" -m pip install -e . --no-build-isolation --no-deps -v || return 1
  "$PY" -c "import binslt._C, binslt._C_cuda; print('built:', binslt._C.__file__, binslt._C_cuda.__file__)"
}

check() {
  local out
  if ! out=$("$PY" -m binslt check --help 2>&1); then
    echo "binslt check: not available (python -m binslt check --help failed):"
    echo "$out" | tail -n 3
    return 200
  fi
  if [ "$DRY" = 1 ]; then
    "$PY" -m binslt check --json "$RES/check.json"
  else
    "$PY" -m binslt check --device cuda --json "$RES/check.json"
  fi
}

# The GPU test files, most valuable first: the Triton and CUDA kernels against the reference,
# then kernel sizes, the error contract, pooling, IF neurons and the converted zoo models.
TEST_FILES="tests/test_triton.py tests/test_cuda.py tests/test_kernel_sizes.py \
tests/test_contract.py tests/test_pool.py tests/test_if.py tests/test_zoo.py"
export TEST_FILES

tests() {
  # shellcheck disable=SC2086
  BINSLT_TRITON_AUTOTUNE=first exec "$PY" -m pytest -m "gpu and not slow" -rfE --maxfail=3 \
    -p no:cacheprovider --junitxml="$RES/pytest_gpu.xml" $TEST_FILES
}

have_sj() { "$PY" -c "import spikingjelly.activation_based" >/dev/null 2>&1; }

bench() {
  export BINSLT_TRITON_AUTOTUNE="${BINSLT_GPU_BENCH_AUTOTUNE:-first}"
  local nosj=()
  if ! have_sj; then
    echo "SpikingJelly is not importable: conv_lif.py --no-sj times the binslt backends alone."
    note "SpikingJelly not importable: binslt backends only (--no-sj)"
    nosj=(--no-sj)
  fi
  if [ "$DRY" = 1 ]; then
    exec "$PY" benchmarks/conv_lif.py --device cpu --sets anchor --modes eval_fwd \
      --backends torch --repeats 1 --warmup 0 --no-check --no-plot --threads 1 \
      --out "$RES" --tag dry "${nosj[@]}"
  fi
  exec "$PY" benchmarks/conv_lif.py --device cuda --sets gpu_ref --no-plot --out "$RES" \
    --tag gpu_ref "${nosj[@]}"
}

network() {
  export BINSLT_TRITON_AUTOTUNE="${BINSLT_GPU_BENCH_AUTOTUNE:-first}"
  if ! have_sj; then
    echo "SpikingJelly is not importable: network.py measures binslt against it; skipped."
    echo "Carry it: bash benchmarks/gpu_wheels.sh here, then run(..., carry=['.whl'])."
    note "skipped: SpikingJelly not importable"
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    exec "$PY" benchmarks/network.py --device cpu --quick --modes search --backends torch \
      --threads 1 --no-plot --out "$RES" --tag dry
  fi
  exec "$PY" benchmarks/network.py --device cuda --quick --batch 32 --no-plot --out "$RES" \
    --tag small
}

ddp() {
  exec "$PY" -m pytest -m "gpu and not slow" -rfE -p no:cacheprovider \
    --junitxml="$RES/pytest_ddp.xml" tests/test_gpu_ddp.py
}

export -f machine build check tests have_sj bench network ddp note

say "binslt gpu_check $STARTED in $ROOT$([ "$DRY" = 1 ] && echo ' (dry run)'): results in $RES," \
    "archive and summary in $DEST, budget ${BUDGET}s"

# Carried wheels (the GPU image has no registry; see benchmarks/gpu_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null; then
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/binslt_site .whl/*.whl > "$RES/wheels.log" 2>&1; then
    export PYTHONPATH="/tmp/binslt_site:$PYTHONPATH"
    say "== wheels: installed $(ls .whl | tr '\n' ' ')"
  else
    say "== wheels: pip install of .whl/ failed (log: wheels.log)"
  fi
fi

step machine 15 machine.log machine
if [ "${BINSLT_SKIP_BUILD:-0}" = "1" ]; then
  record build "skipped (BINSLT_SKIP_BUILD=1)"
else
  step build 140 build.log build
fi
step check 20 check.log check
step tests 75 pytest_gpu.log tests
step bench 45 bench.log bench
step network 35 network.log network
step ddp 40 pytest_ddp.log ddp

summary "finished in $(( SECONDS - START ))s: $([ "$FAILED" = 0 ] && echo 'every step ok' || echo 'some steps FAILED')"
archive
say "== summary ($(( SECONDS - START ))s): $DEST/summary.txt, $DEST/gpu_check.tgz"
cat "$DEST/summary.txt"
exit "$FAILED"
