#!/usr/bin/env bash
# One-shot check on a GPU machine (H100/H200 class, torch and Triton preinstalled, no package
# registry needed). Finishes within about 9 minutes. Steps, each under `timeout`:
#
#   0. wheels    pure-Python test dependencies the GPU image lacks (SpikingJelly, expecttest,
#                loguru), carried as wheels in .whl/ (made here by benchmarks/gpu_wheels.sh),
#                installed into /tmp/site and put on PYTHONPATH
#   1. machine   nvidia-smi, python / torch / triton / spikingjelly versions
#   2. build     pip install -e . --no-build-isolation --no-deps  (BINSLT_CUDA=1 when nvcc is
#                on PATH or under CUDA_HOME, otherwise the build decides)
#   3. info      python -m binslt info  (or binslt.backends() where the CLI is absent)
#   4. tests     pytest -m gpu -q: the CUDA and Triton ops on CUDA tensors against the reference,
#                opcheck, torch.compile, and the nccl torchrun search (tests/test_gpu_ddp.py)
#   5. bench     benchmarks/conv_lif.py --device cuda: the reference layer (T=4 N=64 256->256
#                32x32) and the CPU anchor shape, every GPU backend against SpikingJelly
#   6. network   benchmarks/network.py --device cuda: Conv-4 / VGG-11 / ResNet-19 search step,
#                frozen-ticket eval and peak memory against SpikingJelly (skipped if absent)
#   7. search    benchmarks/search_epoch.py --device cuda (Conv-4 on digits, 2 epochs each)
#   8. sweeps    benchmarks/conv_lif.py --device cuda: VGG-11 convs, firing rates, T; runs with
#                whatever time is left (its CSV is rewritten after every shape)
#
# The device call (one call; only 8 files come back from $OUT, so the results travel as one
# archive), from the repository root after `bash benchmarks/gpu_wheels.sh`:
#   run(command="bash benchmarks/gpu_check.sh /tmp/gc; rc=$?; tar czf $OUT/gpu_check.tgz -C /tmp gc; exit $rc",
#       carry=[".whl"], timeout_s=600)
# then unpack the archive and commit the CSVs under benchmarks/results/ (named by device).
#
# Usage:  bash benchmarks/gpu_check.sh [RESULTS_DIR]
#   RESULTS_DIR (or env BINSLT_RESULTS) receives the logs and CSVs; default benchmarks/results/.
#   BINSLT_SKIP_BUILD=1 skips step 2 (use the installed build).
#   BINSLT_SJ_PATH=DIR is prepended to PYTHONPATH (a SpikingJelly 2.0 source tree, if it is not
#   installed).
#   BINSLT_GPU_BUDGET_S (default 540) is the time budget of the whole script.
#
# A failing step does not stop the others. The summary at the end lists every step's status;
# the exit code is non-zero if any step failed.
set -u

cd "$(dirname "$0")/.."
OUT="${1:-${BINSLT_RESULTS:-benchmarks/results}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${BINSLT_GPU_BUDGET_S:-540}"
export PY="${PYTHON:-python}"
if [ -n "${BINSLT_SJ_PATH:-}" ]; then
  export PYTHONPATH="${BINSLT_SJ_PATH}${PYTHONPATH:+:$PYTHONPATH}"
fi
export SJ_LIF_CUDA_IMPLEMENTATION="${SJ_LIF_CUDA_IMPLEMENTATION:-triton}"
export PYTHONUNBUFFERED=1
START=$SECONDS

# Step 0: carried wheels (the GPU image has no registry; see benchmarks/gpu_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

declare -a NAMES=() STATUS=()
FAILED=0

left() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME TIMEOUT_S LOGFILE CMD...: run CMD under `timeout`, tee its output to LOGFILE.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local avail
  avail=$(left)
  if [ "$avail" -lt 20 ]; then
    NAMES+=("$name"); STATUS+=("SKIPPED (time budget spent)"); FAILED=1
    echo "== $name: skipped, ${avail}s of the budget left" | tee -a "$OUT/gpu_check.log"
    return
  fi
  if [ "$limit" -gt "$avail" ]; then limit=$avail; fi
  local cmd="$*"
  if declare -F "$1" >/dev/null; then  # `timeout` needs a program: run the function in bash
    set -- bash -c "$(declare -f "$1"); $1"
  fi
  echo "== $name (timeout ${limit}s) $(date -u +%H:%M:%S) : ${cmd:0:160}" \
    | tee -a "$OUT/gpu_check.log"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=${PIPESTATUS[0]}
  local dt=$(( SECONDS - t0 ))
  NAMES+=("$name")
  if [ "$rc" -eq 0 ]; then
    STATUS+=("ok (${dt}s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    STATUS+=("TIMEOUT after ${dt}s (log: $log)"); FAILED=1
  elif [ "$rc" -eq 5 ] && [ "$name" = tests ]; then
    STATUS+=("FAILED: pytest collected no gpu-marked tests (log: $log)"); FAILED=1
  else
    STATUS+=("FAILED rc=$rc after ${dt}s (log: $log)"); FAILED=1
  fi
  echo "== $name: ${STATUS[-1]}" | tee -a "$OUT/gpu_check.log"
}

: > "$OUT/gpu_check.log"
echo "binslt gpu_check $(date -u +%FT%TZ) in $(pwd), results in $OUT, budget ${BUDGET}s" \
  | tee -a "$OUT/gpu_check.log"

machine() {
  nvidia-smi || echo "nvidia-smi not available"
  git rev-parse HEAD 2>/dev/null || true
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda",
      torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for mod in ("triton", "spikingjelly", "numpy", "sklearn", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "(no __version__)"))
    except Exception as exc:
        print(mod, "NOT IMPORTABLE:", exc)
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch")
EOF
}

build() {
  local nvcc_path
  nvcc_path=$(command -v nvcc || true)
  if [ -z "$nvcc_path" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    nvcc_path="$CUDA_HOME/bin/nvcc"
  fi
  if [ -z "$nvcc_path" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    nvcc_path=/usr/local/cuda/bin/nvcc
  fi
  if [ -n "$nvcc_path" ]; then
    export BINSLT_CUDA=1
    export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}"
    echo "nvcc: $nvcc_path, CUDA_HOME=$CUDA_HOME, BINSLT_CUDA=1"
  else
    echo "nvcc not found: BINSLT_CUDA left unset (the build decides)"
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  "$PY" -m pip install -e . --no-build-isolation --no-deps -v
}

info() {
  "$PY" -m binslt info && return 0
  echo "(python -m binslt info failed; falling back to binslt.backends())"
  "$PY" -c 'import binslt, pprint; pprint.pprint(binslt.backends())'
}

step machine 30 machine.log machine
if [ "${BINSLT_SKIP_BUILD:-0}" = "1" ]; then
  NAMES+=("build"); STATUS+=("skipped (BINSLT_SKIP_BUILD=1)")
else
  step build 240 build.log build
fi
step info 30 info.log info
step tests 200 pytest_gpu.log "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$OUT/pytest_gpu.xml"
step bench 120 bench_main.log "$PY" benchmarks/conv_lif.py --device cuda \
  --sets gpu_ref,anchor --out "$OUT" --tag main
if [ -f benchmarks/network.py ]; then
  step network 120 network.log "$PY" benchmarks/network.py --device cuda --out "$OUT"
else
  NAMES+=("network"); STATUS+=("skipped (benchmarks/network.py does not exist yet)")
fi
step search 60 search_epoch.log "$PY" benchmarks/search_epoch.py --device cuda --repeats 2 \
  --out "$OUT"
step sweeps 600 bench_sweeps.log "$PY" benchmarks/conv_lif.py --device cuda \
  --sets vgg11,rates,timesteps --repeats 5 --no-check --out "$OUT" --tag sweeps

echo "== summary ($(( SECONDS - START ))s, results in $OUT)" | tee -a "$OUT/gpu_check.log"
for i in "${!NAMES[@]}"; do
  printf '  %-8s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" | tee -a "$OUT/gpu_check.log"
done
exit "$FAILED"
