#!/usr/bin/env bash
# ProMoT at small scale, full size (promot_regression.py): icl_regression's full backbone (d = 20, 41 points, 12 layers,
# width 256), 3 seeds, every arm (ft, pt, promot, lora, mix), budget-matched as the paper (FT 1000 steps, PT 5000,
# ProMoT 5000 + 1000, best checkpoint per stage). Then two variants that explain the outcome, each only once the run
# before it is complete:
#   long    4x the fine-tuning budget (ft, lora, mix and ProMoT's stage 2 at 4000 steps; stage 1 unchanged): does
#           ProMoT's protection last, or does stage 2 catch up with plain FT's damage given time? (paper App. C.3)
#   highlr  fine-tuning at synthetic.py's full-size rate 2e-4 ($HIGH_LR; 4x the faithful one, the backbone's final
#           pretraining rate 5e-5): the quick run lost ProMoT's advantage at synthetic.py's quick rate
# The variants reuse the faithful run's pretrained backbone and its stage-1 prompts (same settings, same seeds).
#
# Everything stays within $BUDGET seconds and resumes when re-run (results in runs/promot/{faithful,long,highlr}/).
# Jobs run as side-by-side processes on the GPU(s) in CUDA_VISIBLE_DEVICES (a 9.5M-parameter model leaves an H200
# mostly idle). Small result files go to $OUT when it is set.
#
#   BUDGET=540 bash gpu/promot.sh     # the GPU run (about 15 GPU-minutes in all): repeat until it says "complete"
#   PRETRAINED=runs/synthetic/pretrain BUDGET=1800 bash gpu/promot.sh   # reuse a finished rotary full backbone
#   PROMOT_PRESET=test DEVICE=cpu PROMOT_RUNS=/tmp/p BUDGET=300 bash gpu/promot.sh   # CPU smoke test, tiny scale
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-540}
PRESET=${PROMOT_PRESET:-full}
DEVICE=${DEVICE:-cuda}
ROOT=${PROMOT_RUNS:-runs/promot}
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }

run() {  # run NAME [flags...]: one promot_regression.py run folder; returns 0 only when it is complete
  local name=$1; shift
  local seconds; seconds=$(left)
  if [ "$seconds" -le 30 ]; then echo "promot.sh: budget spent before '$name'"; return 1; fi
  echo "=== $name ($seconds s left) ==="
  python promot_regression.py --out "$ROOT/$name" --preset "$PRESET" --device "$DEVICE" --time-budget "$seconds" "$@" \
    | tee "$ROOT/$name.log" | grep -v "it/s" || return 1
  grep -q "^promot: complete" "$ROOT/$name.log"
}

reuse_stage_one() {  # the faithful run's stage-1 prompts (pt.json, prompt.safetensors) for a variant's promot jobs
  local folder
  for folder in "$ROOT"/faithful/jobs/promot-s*; do
    [ -f "$folder/pt.json" ] || continue
    mkdir -p "$ROOT/$1/jobs/$(basename "$folder")"
    cp -n "$folder/pt.json" "$folder/prompt.safetensors" "$ROOT/$1/jobs/$(basename "$folder")/"
  done
}

mkdir -p "$ROOT"
if [ "$DEVICE" != cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # up to 12 job processes per GPU share the CPU cores
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
backbone=(); [ -n "${PRETRAINED:-}" ] && backbone=(--pretrained "$PRETRAINED")
status=incomplete
if run faithful ${backbone[@]+"${backbone[@]}"}; then
  base=${PRETRAINED:-$ROOT/faithful/pretrain}
  read -r pt_steps ft_steps < <(python -c "import json; c = json.load(open('$ROOT/faithful/config.json'))
print(c['pt_steps'] or 5 * c['ft_steps'], 4 * c['ft_steps'])")
  reuse_stage_one long
  if run long --pretrained "$base" --ft-steps "$ft_steps" --pt-steps "$pt_steps"; then
    reuse_stage_one highlr
    run highlr --pretrained "$base" --ft-lr "${HIGH_LR:-2e-4}" && status=complete
  fi
fi

if [ -n "${OUT:-}" ]; then  # at most 8 small files: the faithful run's json, md, png, csv and the variants' json, md
  mkdir -p "$OUT"
  for f in faithful/results.json faithful/results.md faithful/curves.png faithful/curves.csv \
           long/results.json long/results.md highlr/results.json highlr/results.md; do
    [ -f "$ROOT/$f" ] && cp "$ROOT/$f" "$OUT/promot_${f//\//_}"
  done
fi
echo "promot.sh: $status after $(($(date +%s) - start)) s (re-run the same command to continue)"
