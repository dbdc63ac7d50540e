#!/usr/bin/env bash
# One GPU session's checks, run through the device tool from the repository root:
#   correctness of the WKV forms on the accelerator (fp32 at highest matmul precision), then the
#   bench_wkv table at the shape. Results go to $OUT (or ./device_out).
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 330 python3 experiments/bench_wkv.py --batch 8 --heads 12 --lengths 1024 4096 --dtype bfloat16 \
  --repeats 10 --json "$OUT/bench_wkv_gpu.json" 2>&1 | tee "$OUT/bench_wkv_gpu.txt"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_wkv_vector.py tests/test_wkv_diag.py tests/test_wkv_dplr.py 2>&1 | tail -5 | tee "$OUT/tests_gpu.txt"
