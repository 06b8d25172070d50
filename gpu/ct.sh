#!/usr/bin/env bash
# Context tuning on the GPU machine, resumable within $BUDGET seconds per call:
#  1. the synthetic reproduction at full size (context_tuning.py --reproduce full; runs/ct/full/): the d = 20 regression
#     backbone (icl_regression REGRESSION_PRESETS["full"]: reused from synthetic.py's rotary full run when that one has
#     finished, identical settings and seed; else pretrained here, compiled, ~2 min on an H200), a learning-rate sweep
#     per family on 32 held-out tasks (each method's six candidate rates in one batched optimisation), then per family,
#     per k in {4, 8, 16, 32}: every method and the CT-KV ablation on 5 seeds x 32 tasks at once (one batched
#     optimisation per method), 95% CIs over tasks. Family "shifted" completes before "offset" starts; --budget stops
#     between runs (each run's records are kept) and the results files are written for what is finished (also on
#     timeout's SIGTERM). Estimate (notes: readme_ctgrid.md): ~10-15 min of one H200 in all -> two calls.
#  2. only when TIME_SHAPES is set and the grid is done: per-task wall time on random-weight Llama shapes (--time).
# A rerun continues where the last call stopped (records.json keeps every finished run; keep the machine warm, or put
# the returned records.json back into runs/ct/full/ first, with the same backbone: the sweep and finished runs are then
# not redone; records of another backbone or of an older version are refused).
#
#   BUDGET=540 bash gpu/ct.sh               # from the repository root; run twice (one GPU: CUDA_VISIBLE_DEVICES[0])
#   CT_TINY=1 BUDGET=300 bash gpu/ct.sh     # the CPU check at tiny scale
#
# Env: BUDGET seconds for this call (default 540); PRETRAINED a finished full backbone folder (default: the synthetic
# run's runs/synthetic/rope-faithful/pretrain if finished); RUNS (default runs/ct); TIME_SHAPES (e.g. 3b) and
# TIME_BUDGET (default 300); OUT (optional) receives the small result files (at most 7).
set -uo pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-540}; TIME_BUDGET=${TIME_BUDGET:-300}; RUNS=${RUNS:-runs/ct}
START=$(date +%s)
if [ -n "${CT_TINY:-}" ]; then
    DEVICE=cpu; SCALE=tiny; COMPILE=""; PRETRAINED=${PRETRAINED:-}
else
    DEVICE=cuda; SCALE=full; COMPILE="--compile"
    SHARED=runs/synthetic/rope-faithful/pretrain
    if [ -z "${PRETRAINED:-}" ] && grep -qs '"done": true' "$SHARED/meta.json"; then PRETRAINED=$SHARED; fi
    PRETRAINED=${PRETRAINED:-}
fi
mkdir -p "$RUNS"
STAMP="$RUNS/.call-start"; touch "$STAMP"  # result files older than this are an earlier call's: not copied to $OUT
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'cpu', '| CUDA_VISIBLE_DEVICES =', '${CUDA_VISIBLE_DEVICES:-unset}')" | tee "$RUNS/device.txt"

# 1. The reproduction: its own --budget ends it between two runs (results written) before the hard timeout; a run of a
#    full cell takes seconds, so 75 s covers the last one and the summary
T=$(left); FINISHED=0
if [ "$T" -gt 90 ]; then
    BACKBONE=(); [ -n "$PRETRAINED" ] && BACKBONE=(--pretrained "$PRETRAINED") && echo "backbone: $PRETRAINED"
    timeout --signal=TERM --kill-after=20 "$T" python context_tuning.py --reproduce "$SCALE" --device "$DEVICE" \
        --budget $(( T - 75 )) $COMPILE "${BACKBONE[@]}" --out "$RUNS/$SCALE" 2>&1 | tee -a "$RUNS/$SCALE.log"
    echo "reproduction: exit ${PIPESTATUS[0]}"
    grep -qs '"finished": true' "$RUNS/$SCALE/run.json" && FINISHED=1
else
    echo "reproduction: budget spent; run again to continue"
fi

# 2. Per-task wall time, only if asked for and the grid is done (each finished shape is kept in time.json)
T=$(left); [ "$T" -gt "$TIME_BUDGET" ] && T=$TIME_BUDGET
if [ -n "${TIME_SHAPES:-}" ] && [ "$FINISHED" = 1 ] && [ "$T" -gt 30 ]; then
    timeout --signal=TERM --kill-after=20 "$T" python context_tuning.py --time "$TIME_SHAPES" --device "$DEVICE" \
        --out "$RUNS/time" 2>&1 | tee -a "$RUNS/time.log"
    echo "timing: exit ${PIPESTATUS[0]}"
fi

# 3. Summary and result files
[ -f "$RUNS/$SCALE/results.md" ] && cat "$RUNS/$SCALE/results.md"
[ -f "$RUNS/time/time.md" ] && cat "$RUNS/time/time.md"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in "$RUNS/device.txt" "$RUNS/$SCALE/results.json" "$RUNS/$SCALE/results.md" "$RUNS/$SCALE/run.json" \
             "$RUNS/$SCALE/records.json" "$RUNS/time/time.json" "$RUNS/time/time.md"; do
        [ -f "$f" ] || continue
        if [ -n "$(find "$f" -newer "$STAMP")" ]; then cp "$f" "$OUT/"; else echo "not copied (an earlier call's): $f"; fi
    done
    echo "copied the result files to $OUT"
fi
echo "gpu/ct.sh: $(( $(date +%s) - START )) s; grid finished: $FINISHED"
