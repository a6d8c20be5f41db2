#!/usr/bin/env bash
# Fetch, here (where pip reaches a registry), the pure-Python wheels that benchmarks/gpu_check.sh
# needs on the GPU machine, whose image has torch, Triton, pytest, hypothesis, safetensors, numpy,
# scikit-learn, matplotlib and tqdm but no registry. They go to .whl/ (git-ignored through
# .git/info/exclude), the folder the device call carries. Versions are those of this machine's
# virtual environment, so both sides test against the same SpikingJelly. The GPU image runs
# Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PYTHON:-python}"
ver() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
specs=()
for pkg in spikingjelly expecttest loguru ${BINSLT_EXTRA_WHEELS:-}; do
  v=$(ver "$pkg")
  if [ -z "$v" ]; then echo "gpu_wheels: $pkg is not installed here; pip install -e '.[test]' first" >&2; exit 2; fi
  specs+=("$pkg==$v")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls -l .whl
