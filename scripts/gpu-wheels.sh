#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks (sdxl_lora_tools/bench/gpu_wheels.txt) into .whl/,
# for its Python 3.12 on x86_64. Run here, before the device call that runs scripts/gpu-run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
grep -v '^#' sdxl_lora_tools/bench/gpu_wheels.txt | grep . | xargs python3 -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
ls -l .whl
