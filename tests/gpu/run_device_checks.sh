#!/usr/bin/env bash
# One lent-GPU session (about 11 minutes): install the carried wheels (.gpu_wheels/, made with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 megatron-core==0.16.1 pytest pluggy
# iniconfig pytest-timeout packaging -d .gpu_wheels`), run the gpu-marked tests, then the train-phase
# benchmark at ~1B parameters in bf16 on NCCL. Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python -m pip install -q --no-index --find-links .gpu_wheels megatron-core pytest pytest-timeout 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu/test_schedule_gpu.py tests/gpu/test_moe_gpu.py -rA -s 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"
timeout 200 python benchmarks/train_phase.py --preset 1b --repeats 5 2>&1 | grep -v -i warn | tail -12 | tee "$OUT/train_phase_1b.txt"
# Packing (issue 16): padded vs token-budget vs packed rows vs THD at a recipe-like length on the GPU, with
# Megatron's unfused local attention and with the trainer's SDPA core attention (THD runs on SDPA; with TE
# installed the trainer would use TE's THD attention instead).
timeout 240 python benchmarks/packing.py --preset 1b --groups 4 --size 8 --limit 2048 --microbatches 4 --repeats 3 \
  2>&1 | grep -v -i warn | tail -14 | tee "$OUT/packing_1b.txt"
