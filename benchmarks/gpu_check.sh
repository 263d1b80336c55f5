#!/usr/bin/env bash
# The whole GPU check in two parts, for a lent GPU machine (device tool), each part within one 10-minute call:
#
#   bash benchmarks/gpu_check.sh "$OUT" 1        # the real segmenter, the CUDA tests, the whole-model step
#   bash benchmarks/gpu_check.sh "$OUT" 2        # the head-only tables
#   bash benchmarks/gpu_check.sh "$OUT"          # both, one after the other; default folder benchmarks/results
#
# Part 1: torchvision deeplabv3_resnet50 with each head (benchmarks/bench_segmenter.py: 512 and 1024 px, fp32 and
# bf16, time, peak memory, kernel launches; issue 41's targets); the CUDA tests (tests/test_cuda.py: CPU parity with
# TF32 off, TF32 and autocast tolerances, half models, no host sync under set_sync_debug_mode("error"), inductor,
# CUDA-graph capture of inference and of a training step, training memory; the half-precision, hardening, budget
# and product-precision tests); the whole-MiniUPerNet training step (bench_train_step.py).
# Part 2: the head-only fp32 and bf16 sweeps, the loop comparison, the whole-model overhead, slide memory.
# It runs from the checkout without installing (PYTHONPATH): the GPU image brings its own torch and torchvision.
# Each step is bounded; the JSON results are rendered into the docs here (benchmarks/render_docs.py).
set -uo pipefail
out=${1:-benchmarks/results}
part=${2:-all}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
bench() { timeout "$1" python3 benchmarks/bench_heads.py --device cuda --no-progress --no-plot "${@:2}"; }
if [[ $part == 1 || $part == all ]]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  } > "$out/gpu.txt" 2>&1
  timeout 200 python3 benchmarks/bench_segmenter.py --device cuda --out "$out/cuda-segmenter.json"
  timeout 220 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_half_precision.py \
    tests/test_hardening.py tests/test_budget.py tests/test_precision_memory.py -rs 2>&1 | tail -c 60000 \
    | tee "$out/cuda-tests.log"
  timeout 60 python3 benchmarks/bench_train_step.py --device cuda --sizes 512 1024 --steps 5 \
    --out "$out/cuda-train-step.json"
fi
if [[ $part == 2 || $part == all ]]; then
  bench 100 --sizes 512 1024 2048 2560 --strides 4 8 --classes 19 150 --channels 512 --repeats 5 --out "$out/cuda.json"
  bench 50 --sizes 512 1024 2560 --strides 4 --classes 150 --channels 512 --dtype bf16 --repeats 5 \
    --out "$out/cuda-bf16.json"
  bench 40 --sizes 512 --strides 4 --classes 150 --channels 512 --loop-reference --no-inference --train-repeats 3 \
    --out "$out/cuda-loop.json"
  bench 70 --model --sizes 512 1280 2560 --strides 4 --classes 150 --channels 512 --no-training --repeats 5 \
    --out "$out/cuda-model.json"
  timeout 40 python3 benchmarks/bench_slide.py --device cuda --out "$out/cuda-slide.json"
fi
ls -l "$out"
