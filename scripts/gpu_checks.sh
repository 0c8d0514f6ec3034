#!/usr/bin/env bash
# Run ON the lent GPU machine, from the repo root, one stage per device call (each fits in its
# 10 minutes):   scripts/gpu_checks.sh tests | kernels | breakdown | train | harvest
# The device call carries .whl (fetched here first by scripts/gpu_wheels.sh). Logs and JSON results
# go to $OUT (the device tool's return folder), else bench_out/gpu. The machine has no internet:
# everything runs on its own python3 (torch, triton, transformers) plus the carried wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: scripts/gpu_checks.sh tests|kernels|breakdown|train|harvest}
out=${OUT:-bench_out/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PY:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c 'import torch, triton, transformers, zarr; print("torch", torch.__version__, "triton", triton.__version__,
          "transformers", transformers.__version__, "zarr", zarr.__version__)'; } | tee "$out/device.txt"
case "$stage" in
  tests)     # bf16/tf32 kernels against float64, determinism, no host sync; the CUDA loader; the
             # bf16 flex_attention harvest; the trainer's loss curve with both backends on CUDA
    timeout 400 $py -m pytest -q -ra -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
    $py -m pytest -q -ra tests/test_kernels_trainer.py 2>&1 | tee -a "$out/gpu_tests.log"
    $py -m kernels.compile_check 2>&1 | tee "$out/compile_check.txt" ;;
  kernels)   timeout 580 $py -m kernels.bench --out "$out/kernels.json" 2>&1 | tee "$out/kernels_bench.log" ;;
  breakdown) timeout 580 $py -m kernels.bench --breakdown --skip-shapes --out "$out/kernels_breakdown.json" 2>&1 \
               | tee "$out/kernels_breakdown.log" ;;
  train)     # scratch caches stay out of $OUT (it all travels back); only the results are copied
    timeout 580 $py -m train.bench --out bench_out/gpu_train 2>&1 | tee "$out/train_bench.log"
    cp bench_out/gpu_train/train_bench.json "$out/" ;;
  harvest)   # first builds the random-weight gemma-2-2b checkpoint (about 10 GB) in .cache/models
    timeout 580 $py -m harvest.bench --out bench_out/gpu_harvest 2>&1 | tee "$out/harvest_bench.log"
    cp bench_out/gpu_harvest/harvest_bench.json "$out/" ;;
  *)         echo "unknown stage $stage"; exit 2 ;;
esac
