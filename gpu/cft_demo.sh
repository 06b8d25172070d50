#!/usr/bin/env bash
# cft.py's real-model demo (no --data: the built-in fictional pharmacology in the model's own tokenizer, CFT beside
# CPT, closed-book accuracy before and after, the pretrained-model settings: full fine-tuning, lr 2e-5, 10 epochs of
# 8 x 256 tokens) on a randomly initialised llama2-7b-shaped Hugging Face folder (bf16, the real Llama-2 tokenizer),
# under torchrun --nproc_per_node 2 (FSDP2). Random weights: the accuracies mean nothing; time, peak memory and
# tokens/s do.
#
#   BUDGET=1200 bash gpu/cft_demo.sh                       # from the repository root, on the GPU machine (2 GPUs)
#   TINY=1 BUDGET=300 bash gpu/cft_demo.sh                 # the CPU smoke run: a tiny model, 2 gloo processes
#
# Env: BUDGET seconds for everything (default 1200); TOKENIZER (default .gpu/llama2-tokenizer/tokenizer.model; TINY:
# ../shared/data/llama2-tokenizer/tokenizer.model); STEPS (optimiser steps per method; default the demo's 10 epochs);
# NPROC (default 2); OUT (optional) receives the result files. Resumable: the model folder is made once (written
# whole, then renamed), and a rerun passes --resume, so a finished method is skipped and an unfinished one starts
# again (no training-state checkpoints: a 7B's is ~107 GB).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
BUDGET=${BUDGET:-1200}; NPROC=${NPROC:-2}; STEPS=${STEPS:-}; TINY=${TINY:-}
START=$(date +%s)
if [ -n "$TINY" ]; then
    RUNS=runs/cft_demo_tiny; DEVICE=(--device cpu); SHAPE=tiny
    TOKENIZER=${TOKENIZER:-../shared/data/llama2-tokenizer/tokenizer.model}; STEPS=${STEPS:-2}
    export OMP_NUM_THREADS=1
else
    RUNS=runs/cft_demo; DEVICE=(); SHAPE=llama2-7b
    TOKENIZER=${TOKENIZER:-.gpu/llama2-tokenizer/tokenizer.model}
fi
MODEL=$RUNS/$SHAPE-random; RUN=$RUNS/run; mkdir -p "$RUNS"
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'cpu', '| GPUs:', torch.cuda.device_count())" | tee "$RUNS/device.txt"

# 1. The model folder: model.create_model (random, seed 0) + hf_checkpoint.save_pretrained in bf16 with the tokenizer.
if [ ! -f "$MODEL/config.json" ]; then
    T0=$(date +%s)
    python - "$MODEL" "$TOKENIZER" "$SHAPE" <<'EOF' || { echo "could not create $MODEL"; exit 1; }
import sys, torch
from hf_checkpoint import save_pretrained
from model import ModelConfig, create_model
folder, tokenizer, shape = sys.argv[1:]
cfg = ModelConfig.from_name("llama2-7b") if shape == "llama2-7b" else \
    ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
device = "cuda" if torch.cuda.is_available() else "cpu"
model = create_model(cfg, device=device, dtype=torch.bfloat16, seed=0)
save_pretrained(model, folder, dtype=torch.bfloat16, tokenizer=tokenizer)
print(f"{folder}: {cfg.num_params() / 1e9:.2f}B parameters, bf16")
EOF
    echo "model folder: $(( $(date +%s) - T0 )) s"
fi

# 2. The demo, resumed on a rerun (finished methods skipped).
LEFT=$(( BUDGET - ($(date +%s) - START) ))
if [ "$LEFT" -le 60 ]; then echo "budget spent before the demo"; else
    RESUME=(); [ -f "$RUN/cft/config.json" ] && RESUME=(--resume)
    T0=$(date +%s)
    timeout --signal=TERM --kill-after=30 "$LEFT" torchrun --standalone --nproc_per_node "$NPROC" cft.py \
        --checkpoint "$MODEL" --out "$RUN" --cache-dir "$RUNS/cache" --no-progress "${DEVICE[@]}" \
        ${STEPS:+--max-steps "$STEPS"} "${RESUME[@]}" 2>&1 | grep -v "^W[0-9]\|OMP_NUM\|^\*\*\*" | tee -a "$RUNS/cft.log"
    echo "cft.py: exit ${PIPESTATUS[0]}, wall $(( $(date +%s) - T0 )) s" | tee -a "$RUNS/cft.log"
fi

# 3. The summary: per method the time (build, evaluations and training; the final save excluded), peak GPU memory of
# rank 0, tokens/s (median over the steps after the first), MFU, and the (meaningless) accuracies.
python - "$RUN" "$RUNS" <<'EOF' | tee "$RUNS/summary.md"
import json, pathlib, statistics, sys
run, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
device = (runs / "device.txt").read_text().strip() if (runs / "device.txt").is_file() else "?"
print(f"cft.py real-model demo on a random-init model ({device}); random weights: accuracies are meaningless\n")
print("| method | steps | seconds | peak GiB (rank 0) | tokens/s | MFU | accuracy before | after | final loss |")
print("|---|---|---|---|---|---|---|---|---|")
summary = {}
for method in ("cft", "cpt"):
    try:
        result = json.loads((run / method / "final" / "result.json").read_text())
        metrics = [json.loads(l) for l in (run / method / "metrics.jsonl").read_text().splitlines() if l.strip()]
    except (OSError, ValueError):
        print(f"| {method} | not finished | | | | | | | |")
        continue
    rates = [r["tokens_per_s"] for r in metrics[1:]] or [r["tokens_per_s"] for r in metrics]
    mfu = [r["mfu"] for r in metrics[1:]] or [r["mfu"] for r in metrics]
    row = dict(result, steps=len(metrics), tokens_per_s=statistics.median(rates), mfu=statistics.median(mfu))
    summary[method] = row
    print(f"| {method} | {row['steps']} | {row['seconds']} | {row.get('peak_memory_gib', '-')} | "
          f"{row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | {row['before']:.1%} | {row['after']:.1%} | "
          f"{row['loss']:.4f} |")
(runs / "summary.json").write_text(json.dumps(summary, indent=1))
EOF

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$RUNS/summary.md" "$RUNS/summary.json" "$RUNS/device.txt" "$RUNS/cft.log" "$OUT/" 2>/dev/null
    for METHOD in cft cpt; do cp "$RUN/$METHOD/metrics.jsonl" "$OUT/$METHOD-metrics.jsonl" 2>/dev/null; done
fi
exit 0
