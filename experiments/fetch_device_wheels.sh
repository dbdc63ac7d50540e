#!/usr/bin/env bash
# Run HERE (the device machine has no network) before experiments/device_check.sh: downloads the
# wheels the device image lacks into .whl/ (git-ignored), for the device tool to carry:
#   bash experiments/fetch_device_wheels.sh
#   then the device tool's run with command "bash experiments/device_check.sh", carry [".whl"].
# fla-core is flash-linear-attention's kernels (fla.ops), for the fla rows of bench_kernels.py;
# pure Python, its one dependency (einops) and torch/triton are in the device image.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl fla-core==0.6.0
ls -la .whl
