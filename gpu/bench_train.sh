#!/usr/bin/env bash
# The training-loop benchmarks of BENCHMARKS.md on 2 x H200: one GPU (8 layers of llama2-7b width), then FSDP2 over
# both (the full llama2-7b) at micro-batch 2 and 1. Run from the repository root: bash gpu/bench_train.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-runs/bench_train}; mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
CUDA_VISIBLE_DEVICES=0 python bench.py train ${SINGLE_ARGS:-} 2>&1 | tee "$OUT/train_single.md"
torchrun --standalone --nproc_per_node 2 bench.py train --layers 0 --micro-batch-size 2 --steps 6 --warmup 2 \
    ${FSDP_ARGS:-} 2>&1 | grep -v "^W1\|OMP_NUM" | tee "$OUT/train_fsdp_mb2.md"
