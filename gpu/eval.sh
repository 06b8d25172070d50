#!/usr/bin/env bash
# FinBen-style generative scoring of the three finance tasks (FiQA-SA 235, Causal20 8,628, MultiFin 546 items; the
# project's k = 5 demonstrations) on a random-init llama2-7b shape, timed beside the log-likelihood path, with
# evaluate.py itself. Random weights: the scores mean nothing, the times and the throughput do.
#
#   BUDGET=1500 bash gpu/eval.sh                                   # from the repository root, on the GPU machine
#   MODEL=tiny LIMIT=6 DATA=../shared/data BUDGET=300 bash gpu/eval.sh   # the CPU smoke run at tiny scale
#
# Env: BUDGET seconds for everything (default 1500); DATA (default .gpu/eval-data, laid out as ../shared/data);
# MODEL preset (default llama2-7b); LIMIT questions per task (default: all); SHOTS (default 5); GEN_TOKENS (8);
# BATCH_TOKENS (default 32768: one shared prefix + the rows' own positions per batch, ~230 Causal20 rows);
# OUT (optional) receives the result files. Resumable: each finished run's JSON in runs/eval/ is kept and skipped
# on a rerun; an interrupted run's --out placeholder is taken over. Several GPUs in CUDA_VISIBLE_DEVICES: torchrun
# splits the rows across them.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
BUDGET=${BUDGET:-1500}; DATA=${DATA:-.gpu/eval-data}; MODEL=${MODEL:-llama2-7b}; SHOTS=${SHOTS:-5}
GEN_TOKENS=${GEN_TOKENS:-8}; LIMIT=${LIMIT:-}; BATCH_TOKENS=${BATCH_TOKENS:-32768}
START=$(date +%s)
RUNS=runs/eval; mkdir -p "$RUNS"
TAG="$MODEL-k$SHOTS${LIMIT:+-limit$LIMIT}"
GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -gt 1 ]; then LAUNCH=(torchrun --standalone --nproc_per_node "$GPUS"); else LAUNCH=(python); fi
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'cpu', '| GPUs:', torch.cuda.device_count())" | tee "$RUNS/$TAG-device.txt"

for SCORING in generate loglik; do
    RESULT="$RUNS/$TAG-$SCORING.json"
    if python -c "import json, sys; sys.exit(0 if 'tasks' in json.load(open('$RESULT')) else 1)" 2>/dev/null; then
        echo "$RESULT: done before, kept"; continue
    fi
    LEFT=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$LEFT" -le 30 ]; then echo "budget spent before the $SCORING run"; break; fi
    T0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=20 "$LEFT" "${LAUNCH[@]}" evaluate.py --random-init --model "$MODEL" \
        --tokenizer "$DATA/llama2-tokenizer/tokenizer.model" --data-dir "$DATA" --tasks fiqa-sa,causal20,multifin \
        --shots "$SHOTS" --scoring "$SCORING" --gen-tokens "$GEN_TOKENS" --batch-tokens "$BATCH_TOKENS" ${LIMIT:+--limit "$LIMIT"} \
        --name "$MODEL random, $SCORING" --out "$RESULT" 2>&1 | grep -v "^W[0-9]\|OMP_NUM" | tee "$RUNS/$TAG-$SCORING.log"
    STATUS=${PIPESTATUS[0]}
    echo "$SCORING: exit $STATUS, wall $(python -c "import time; print(round(time.time() - $T0, 1))") s" \
        | tee -a "$RUNS/$TAG-$SCORING.log"
    python -c "print(round($(date +%s.%N) - $T0, 1))" > "$RUNS/$TAG-$SCORING.wall"
done

# The table: per task and path, the scoring/generation seconds (model loading excluded; the first task of a path
# includes compiling attention kernels), items per second, and the metrics.
python - "$RUNS" "$TAG" <<'EOF' | tee "$RUNS/$TAG.md"
import json, pathlib, sys
runs, tag = pathlib.Path(sys.argv[1]), sys.argv[2]
device = (runs / f"{tag}-device.txt").read_text().strip() if (runs / f"{tag}-device.txt").is_file() else "?"
print(f"evaluate.py, finance tasks, {tag} ({device}); random weights: scores are meaningless, times are not\n")
print("| task | path | items | k | seconds | items/s | accuracy | weighted F1 | missing |")
print("|---|---|---|---|---|---|---|---|---|")
for scoring in ("generate", "loglik"):
    path = runs / f"{tag}-{scoring}.json"
    try:
        result = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        print(f"| (all) | {scoring} | not finished | | | | | | |")
        continue
    total_items = total_seconds = 0
    for task, s in result.items():
        rate = s["n"] / s["seconds"] if s["seconds"] else float("nan")
        total_items, total_seconds = total_items + s["n"], total_seconds + s["seconds"]
        missing = f"{s['missing']:.3f}" if "missing" in s else "-"
        print(f"| {task} | {scoring} | {s['n']} | {s['shots']} | {s['seconds']:.1f} | {rate:.1f} | "
              f"{s['accuracy']:.3f} | {s['weighted_f1']:.3f} | {missing} |")
    wall = (runs / f"{tag}-{scoring}.wall").read_text().strip() if (runs / f"{tag}-{scoring}.wall").is_file() else "?"
    print(f"| all three | {scoring} | {total_items} | | {total_seconds:.1f} (wall incl. model init {wall}) | "
          f"{total_items / total_seconds:.1f} | | | |")
EOF

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$RUNS/$TAG.md" "$RUNS/$TAG-device.txt" "$OUT/" 2>/dev/null
    for SCORING in generate loglik; do
        cp "$RUNS/$TAG-$SCORING.json" "$RUNS/$TAG-$SCORING.log" "$OUT/" 2>/dev/null
    done
fi
exit 0
