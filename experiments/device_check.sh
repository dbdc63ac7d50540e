#!/usr/bin/env bash
# One GPU session's checks, run through the device tool from the repository root (about 10 min):
#   1. the compiled Pallas kernels on the accelerator against the oracles (tests that skip on CPU);
#   2. experiments/bench_kernels.py: one table, our kernels vs oracle, parallel form and fla;
#   3. experiments/bench_wkv.py: parallel form vs oracle (v4-v7, chunks 32 and 64);
#   4. the XLA WKV forms' tests on the accelerator at fp32 highest matmul precision.
# Optional wheels (fla-core for the fla rows) travel in .whl/: run experiments/fetch_device_wheels.sh
# here first and name .whl in the device tool's carry. After step 1 passes, add the platform to
# rwkv_jax.config.PALLAS_VERIFIED_PLATFORMS so that wkv="auto" uses the kernels there.
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# Four workers compile the kernels side by side (each kernel's Triton compile is single-threaded,
# up to ~10 s on this kind of CPU); they share the GPU, so no worker may preallocate its memory.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 -m pytest -q -p no:cacheprovider -n 4 -k "compiled" \
  tests/test_pallas_dplr.py tests/test_pallas_diag.py tests/test_pallas_vector.py 2>&1 | tail -15 | tee "$OUT/tests_pallas_gpu.txt"
timeout 240 python3 experiments/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels_gpu.txt"
timeout 150 python3 experiments/bench_wkv.py --batch 8 --heads 12 --lengths 4096 --dtype bfloat16 \
  --chunk-sizes 32 64 --repeats 10 --json "$OUT/bench_wkv_gpu.json" 2>&1 | tee "$OUT/bench_wkv_gpu.txt"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 60 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_wkv_dplr.py 2>&1 | tail -5 | tee "$OUT/tests_gpu.txt"
