#!/usr/bin/env bash
# One hash of the sources the compiled extensions are built from (csrc/ and setup.py, as they
# are in the work tree): benchmarks/gpu_prebuild.sh records it beside the extensions it builds,
# benchmarks/gpu_check.sh uses carried extensions only where it matches.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \
  -o -name 'setup.py' \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
