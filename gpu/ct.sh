#!/usr/bin/env bash
# Context tuning on the GPU machine, resumable within $BUDGET seconds:
#  1. per-task wall time of every method on random-weight Llama shapes (1B, 3B = marc's Llama-3.2-3B, 7B) under marc's
#     MMLU recipe with k = 16, beside marc's reported seconds (context_tuning.py --time; runs/ct/time/);
#  2. the synthetic reproduction at full size (context_tuning.py --reproduce full; runs/ct/full/): the d = 20 regression
#     backbone pretrained here (icl_regression, REGRESSION_PRESETS["full"], compiled: ~2-3 min on an H200), a
#     learning-rate sweep per method on held-out tasks, then 5 seeds x 32 tasks x k in {4, 8, 16, 32} x two task
#     families, every method and the CT-KV ablation, with 95% CIs over tasks.
# A rerun skips the timed shapes and continues the grid where it stopped (every finished run is in records.json).
#
#   BUDGET=1500 bash gpu/ct.sh              # from the repository root on the GPU machine (one GPU: the first of
#                                           # CUDA_VISIBLE_DEVICES)
#   CT_TINY=1 BUDGET=300 bash gpu/ct.sh     # the CPU check at tiny scale
#
# Env: BUDGET seconds for everything (default 1500); TIME_BUDGET the timing's share (default 420); TIME_SHAPES
# (default 1b,3b,7b); RUNS (default runs/ct); OUT (optional) receives the result files (json/md, 7 files).
set -uo pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-1500}; TIME_BUDGET=${TIME_BUDGET:-420}; RUNS=${RUNS:-runs/ct}
START=$(date +%s)
if [ -n "${CT_TINY:-}" ]; then
    DEVICE=cpu; SHAPES=${TIME_SHAPES:-tiny}; SCALE=tiny; COMPILE=""
else
    DEVICE=cuda; SHAPES=${TIME_SHAPES:-1b,3b,7b}; SCALE=full; COMPILE="--compile"
fi
mkdir -p "$RUNS"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'cpu', '| CUDA_VISIBLE_DEVICES =', '${CUDA_VISIBLE_DEVICES:-unset}')" | tee "$RUNS/device.txt"

# 1. Per-task wall time (each finished shape is kept in time.json; time.md is the table)
T=$(left); [ "$T" -gt "$TIME_BUDGET" ] && T=$TIME_BUDGET
if [ "$T" -gt 30 ]; then
    timeout --signal=TERM --kill-after=20 "$T" python context_tuning.py --time "$SHAPES" --device "$DEVICE" \
        --out "$RUNS/time" 2>&1 | tee -a "$RUNS/time.log"
    echo "timing: exit ${PIPESTATUS[0]}"
else
    echo "timing: budget spent"
fi

# 2. The reproduction: its own --budget ends it cleanly (results written) a little before the hard timeout
T=$(left)
if [ "$T" -gt 90 ]; then
    timeout --signal=TERM --kill-after=30 "$T" python context_tuning.py --reproduce "$SCALE" --device "$DEVICE" \
        --budget $(( T - 60 )) $COMPILE --out "$RUNS/$SCALE" 2>&1 | tee -a "$RUNS/$SCALE.log"
    echo "reproduction: exit ${PIPESTATUS[0]}"
else
    echo "reproduction: budget spent; run again to continue"
fi

# 3. Summary and result files
[ -f "$RUNS/time/time.md" ] && cat "$RUNS/time/time.md"
[ -f "$RUNS/$SCALE/results.md" ] && cat "$RUNS/$SCALE/results.md"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in "$RUNS/device.txt" "$RUNS/time/time.json" "$RUNS/time/time.md" "$RUNS/$SCALE/results.json" \
             "$RUNS/$SCALE/results.md" "$RUNS/$SCALE/run.json" "$RUNS/$SCALE/records.json"; do
        [ -f "$f" ] && cp "$f" "$OUT/"
    done
    echo "copied the result files to $OUT"
fi
echo "gpu/ct.sh: $(( $(date +%s) - START )) s"
