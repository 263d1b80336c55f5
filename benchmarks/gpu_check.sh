#!/usr/bin/env bash
# The whole GPU check of issue 14 in one go, for a lent GPU machine (device tool):
#
#   bash benchmarks/gpu_check.sh "$OUT"          # or a folder of your own; default benchmarks/results
#
# 1. the CUDA tests (tests/test_cuda.py: CPU parity with TF32 off, TF32 and autocast tolerances, half models, no
#    host sync under set_sync_debug_mode("error"), inductor, deterministic mode, training memory) and the half-
#    precision tests with float16 on CUDA;
# 2. the CUDA tables: head-only fp32 and bf16 sweeps, the loop comparison, the whole-model overhead, slide memory.
# It runs from the checkout without installing (PYTHONPATH): the GPU image brings its own torch. Each step is timed
# and bounded so the whole fits one 10-minute call; the JSON results are re-rendered here with --render.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
bench() { timeout "$1" python3 benchmarks/bench_heads.py --device cuda --no-progress --no-plot "${@:2}"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$out/gpu.txt" 2>&1
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_half_precision.py tests/test_hardening.py \
  -s 2>&1 | tee "$out/cuda-tests.log"
bench 120 --sizes 512 1024 2048 2560 --strides 4 8 --classes 19 150 --channels 512 --repeats 5 --out "$out/cuda.json"
bench 60 --sizes 512 1024 2560 --strides 4 --classes 150 --channels 512 --dtype bf16 --repeats 5 --out "$out/cuda-bf16.json"
bench 60 --sizes 512 --strides 4 --classes 150 --channels 512 --loop-reference --no-inference --train-repeats 3 \
  --out "$out/cuda-loop.json"
bench 90 --model --sizes 512 1280 2560 --strides 4 --classes 150 --channels 512 --no-training --repeats 5 \
  --out "$out/cuda-model.json"
timeout 60 python3 benchmarks/bench_slide.py --device cuda --out "$out/cuda-slide.json"
ls -l "$out"
