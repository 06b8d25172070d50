#!/usr/bin/env bash
# synthetic.py at full size, three settings of 3 tasks x 3 methods x $SEEDS seeds each:
#   rope-faithful     rotary backbone, the official prompts, fast recipe: re-measured with the probes (the copy
#                     shortcut: error with the context pairs shuffled / on fresh x's) and both inner products
#   rope-fresh        the same backbone (one pretraining, shared), CFT context on fresh x's: no shortcut possible
#   learned-official  GPT-2-style learned absolute positions, the official prompts and recipe (Adam 1e-4 constant,
#                     batch 64, fp32, no clip): as many of its 50k steps (relu 100k) as the budget allows, continued
#                     by the next call; evaluated where each run stands (`evaluate --partial`)
# Everything is resumable: re-run the same command (machine still warm) to continue; results in $ROOT.
# Independent runs go side by side, one process each, over the GPUs in CUDA_VISIBLE_DEVICES: with two or more, the
# rope settings take the first half and learned-official the second; with one, all share it (rope first).
#
#   BUDGET=540 bash gpu/synthetic.sh                       # run from the repository root; re-run to continue
#   DEVICE=cpu PRESET=test SEEDS=1 OFFICIAL_STEPS=4 EXTRA_FLAGS="--pretrain-steps 60 --finetune-steps 20" \
#     BUDGET=300 bash gpu/synthetic.sh                     # CPU smoke test
#
# Writes to $OUT (if set): summary.md (tables beside the official numbers, verdicts), summary.json, mechanism.png
# (polynomial inner product per setting), inner_product_<setting>.png (both inner products, every task).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
BUDGET=${BUDGET:-540}          # seconds for this call, everything included
ROOT=${ROOT:-runs/synthetic}
PRESET=${PRESET:-full}
SEEDS=${SEEDS:-3}
DEVICE=${DEVICE:-cuda}
RESERVE=${RESERVE:-120}        # seconds kept for the final evaluation, summary and copies
ROPE_JOBS=${ROPE_JOBS:-14}     # processes per rope grid (two grids side by side)
LEARNED_JOBS=${LEARNED_JOBS:-27}  # every learned-official run at once, so that all advance together
START=$(date +%s)
left() { echo $(( BUDGET - RESERVE - ($(date +%s) - START) )); }
COMMON=(--preset "$PRESET" --seeds "$SEEDS" --device "$DEVICE" ${EXTRA_FLAGS:-})  # EXTRA_FLAGS: word-split
LEARNED=(--position learned --recipe official ${OFFICIAL_STEPS:+--finetune-steps "$OFFICIAL_STEPS"})
LEARNED_COMPILE=${FT_COMPILE:+--compile}  # FT_COMPILE=1: torch.compile each learned-official process (untested on GPU)
mkdir -p "$ROOT/logs"

if [ "$DEVICE" = cpu ]; then
  ROPE_GPUS=""; LEARNED_GPUS=""; ROPE_JOBS=${CPU_JOBS:-1}; LEARNED_JOBS=${CPU_JOBS:-1}
else
  GPUS=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}
  IFS=, read -ra LIST <<< "$GPUS"
  if [ ${#LIST[@]} -ge 2 ]; then
    HALF=$(( ${#LIST[@]} / 2 ))
    ROPE_GPUS=$(IFS=,; echo "${LIST[*]:0:$HALF}"); LEARNED_GPUS=$(IFS=,; echo "${LIST[*]:$HALF}")
  else
    ROPE_GPUS=$GPUS; LEARNED_GPUS=$GPUS
  fi
  python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi
echo "budget ${BUDGET}s; rope settings on GPUs [$ROPE_GPUS], learned-official on [$LEARNED_GPUS]"
pretrained() { grep -qs '"done": true' "$1/pretrain/meta.json"; }

rope_settings() {
  python synthetic.py pretrain --out "$ROOT/rope-faithful" "${COMMON[@]}" --time-budget "$(left)" \
    > "$ROOT/logs/pretrain-rope.log" 2>&1
  tail -n 1 "$ROOT/logs/pretrain-rope.log"
  pretrained "$ROOT/rope-faithful" || return 0
  mkdir -p "$ROOT/rope-fresh"
  [ -e "$ROOT/rope-fresh/pretrain" ] || ln -s ../rope-faithful/pretrain "$ROOT/rope-fresh/pretrain"
  python synthetic.py all --out "$ROOT/rope-faithful" "${COMMON[@]}" --jobs "$ROPE_JOBS" --time-budget "$(left)" \
    > "$ROOT/logs/rope-faithful.log" 2>&1 &
  python synthetic.py all --out "$ROOT/rope-fresh" "${COMMON[@]}" --fresh-context --jobs "$ROPE_JOBS" \
    --time-budget "$(left)" > "$ROOT/logs/rope-fresh.log" 2>&1 &
  wait
  tail -n 1 "$ROOT/logs/rope-faithful.log" "$ROOT/logs/rope-fresh.log"
}

learned_setting() {
  python synthetic.py pretrain --out "$ROOT/learned-official" "${COMMON[@]}" "${LEARNED[@]}" \
    --time-budget "$(left)" > "$ROOT/logs/pretrain-learned.log" 2>&1
  tail -n 1 "$ROOT/logs/pretrain-learned.log"
  pretrained "$ROOT/learned-official" || return 0
  if [ "$ROPE_GPUS" = "$LEARNED_GPUS" ] && [ "$DEVICE" != cpu ]; then
    # one GPU: the rope grids (fixed work) first, then the open-ended official runs
    while kill -0 "$ROPE_PID" 2> /dev/null; do sleep 5; done
  fi
  python synthetic.py all --out "$ROOT/learned-official" "${COMMON[@]}" "${LEARNED[@]}" --jobs "$LEARNED_JOBS" \
    $LEARNED_COMPILE --time-budget "$(left)" > "$ROOT/logs/learned-official.log" 2>&1
  tail -n 1 "$ROOT/logs/learned-official.log"
}

CUDA_VISIBLE_DEVICES=$ROPE_GPUS rope_settings &
ROPE_PID=$!
CUDA_VISIBLE_DEVICES=$LEARNED_GPUS learned_setting &
wait

# Where every run stands (finished runs: eval.json; unfinished: their last checkpoint), then the summary.
for setting in rope-faithful rope-fresh learned-official; do
  [ -f "$ROOT/$setting/config.json" ] && [ -d "$ROOT/$setting/finetune" ] || continue
  log=$ROOT/logs/evaluate-$setting.log
  python synthetic.py evaluate --out "$ROOT/$setting" --device "$DEVICE" --partial > "$log" 2>&1 \
    && python synthetic.py plot --out "$ROOT/$setting" >> "$log" 2>&1 || tail -n 3 "$log"
done
# the mechanism figure's panels in this order: the fresh-context setting first (README shows it)
SETTINGS=$(for s in rope-fresh learned-official rope-faithful; do [ -f "$ROOT/$s/config.json" ] && echo "$s"; done)
python synthetic.py summary --out "$ROOT" --settings $SETTINGS | tee "$ROOT/logs/summary.log"
python - "$ROOT" << 'EOF'
import json, sys
from pathlib import Path
for setting in sorted(Path(sys.argv[1]).glob("*/finetune")):
    metas = sorted(setting.glob("*/meta.json"))
    steps = [json.loads(m.read_text())["step"] for m in metas]
    done = sum((m.parent / "eval.json").is_file() for m in metas)
    if steps:
        print(f"{setting.parent.name}: {len(steps)} runs, {done} finished, steps {min(steps)}-{max(steps)}")
EOF
echo "used $(( $(date +%s) - START ))s of ${BUDGET}s"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in summary.md summary.json mechanism.png; do [ -f "$ROOT/$f" ] && cp "$ROOT/$f" "$OUT/"; done
  for setting in rope-faithful rope-fresh learned-official; do
    png=$ROOT/$setting/inner_product.png
    [ -f "$png" ] && cp "$png" "$OUT/inner_product_$setting.png"
  done
  ls "$OUT"
fi
