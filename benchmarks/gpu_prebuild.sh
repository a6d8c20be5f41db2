#!/usr/bin/env bash
# Build, here, the C++ and CUDA extensions for the GPU machine's Python and torch, so that
# benchmarks/gpu_check.sh does not spend its time limit compiling. The GPU machine runs
# Python 3.12 and torch 2.11: point PYTHON at an interpreter of that pair with torch (and
# setuptools, numpy, ninja if present) installed, e.g. a scratch virtual environment made with
#   /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/dev212 &&
#   /tmp/dev212/bin/pip install torch==2.11.* triton==3.6.* numpy setuptools ninja
# The sources are copied to a temporary folder (the work tree is not touched), built with
# TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200) and BINSLT_CUDA=1, stripped of debug sections,
# and left in .prebuilt/ (git-ignored through .git/info/exclude) with SOURCES.sha256, the hash
# of the sources they were built from (scripts/gpu_sources_hash below). gpu_check.sh copies
# them into binslt/ only when that hash matches its tree's; otherwise it builds on the device.
#
# Usage: PYTHON=/tmp/dev212/bin/python bash benchmarks/gpu_prebuild.sh
# Then carry it: run(command=..., carry=[".whl", ".prebuilt"], ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="${PYTHON:?set PYTHON to a Python with the GPU machine torch (see the header)}"
grep -qx '/.prebuilt/' .git/info/exclude 2>/dev/null || echo '/.prebuilt/' >> .git/info/exclude
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
hash=$(bash benchmarks/gpu_sources_hash.sh)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z csrc setup.py pyproject.toml README.md binslt kernels | xargs -0 cp --parents -t "$tmp"
cd "$tmp"
start=$SECONDS
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" BINSLT_CUDA=1 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build_ext --inplace
echo "built in $(( SECONDS - start )) s"
rm -rf "$ROOT/.prebuilt" && mkdir -p "$ROOT/.prebuilt"
for so in binslt/_C.*.so binslt/_C_cuda.*.so; do
  strip --strip-debug -o "$ROOT/.prebuilt/$(basename "$so")" "$so"
done
echo "$hash" > "$ROOT/.prebuilt/SOURCES.sha256"
ls -l "$ROOT/.prebuilt"
