#!/usr/bin/env bash
# DPO changes behaviour, measured: a briefly fine-tuned tiny model that still confuses answers answers
# the training split (greedy and sampled); its wrong answers become preference pairs (chosen = the
# reference answer, rejected = its own answer); DPO from that model. Accuracy on the test split before
# and after, against a control (the same steps of plain SFT on the chosen answers), with the blind
# control (blank images) and the majority class.
#
#   bash scripts/demo_dpo.sh [--out runs/demo_dpo] [--seed 0] [--images 1500] [--sft-steps 300] [--dpo-steps 150]
# Rerun the same command after an interruption to continue in its --out (scripts/lib/demo_out.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/demo_out.sh
OUT=runs/demo_dpo SEED=0 IMAGES=1500 SFT_STEPS=300 DPO_STEPS=150
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --sft-steps) SFT_STEPS=$2; shift 2 ;;
    --dpo-steps) DPO_STEPS=$2; shift 2 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "demo_dpo.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
claim_out demo_dpo.sh "$OUT" "--seed $SEED" "--images $IMAGES" "--sft-steps $SFT_STEPS" "--dpo-steps $DPO_STEPS"
start=$(date +%s)
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a 0.7M-parameter model: one thread per process (see demo.sh)
step() { printf '\n== [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
DATA=$OUT/data SETS=$OUT/data/sets
COMMON=(--image_folder "$DATA" --version tinyllama --report_to none --seed "$SEED" --logging_steps 25
        --save_strategy no --dataloader_num_workers 1 --per_device_train_batch_size 32)

# Finished steps are skipped on a rerun: a training run is finished once its trainer_state.json is written
# (train/run_dir.py); an interrupted one (no checkpoints: --save_strategy no) trains again from its start.
trained() { [ -f "$OUT/$1/trainer_state.json" ]; }
if step_done data; then
  step "1/6 data: done in an earlier run ($SETS)"
else
  step "1/6 data: synthesize, validate, partition by image"
  python -m data_tools.synthesize --out-dir "$DATA" --num-images "$IMAGES" --image-size 32 --layout grid \
    --objects alike --question-types color shape count presence --seed "$SEED" --overwrite
  python -m data_tools.validate --data "$DATA/dataset.json" --image-folder "$DATA" >/dev/null
  python -m data_tools.partition --data "$DATA/dataset.json" --image-folder "$DATA" --out-dir "$SETS" --seed "$SEED" \
    --stratify scene >/dev/null
  mark_done data
fi

step "2/6 brief SFT of a tiny random model ($SFT_STEPS steps: it still confuses answers)"
if ! step_done base; then
  python -m llava_tiny.testing.tiny --out "$OUT/base" --hidden 128 --layers 2 --image-size 32 --patch-size 16 \
    --vision-hidden 64 --vision-layers 2 --seed "$SEED" >/dev/null
  mark_done base
fi
trained sft || python llava_tiny/train/train.py --model_name_or_path "$OUT/base/llm" --vision_tower "$OUT/base/clip" \
  --unfreeze_mm_vision_tower True --data_path "$SETS/data_train.json" --output_dir "$OUT/sft" \
  --max_steps "$SFT_STEPS" --learning_rate 1e-3 --warmup_ratio 0.05 --lr_scheduler_type cosine --packing True \
  "${COMMON[@]}"

step "3/6 its answers on the training split (greedy, and 2 samples at temperature 1) -> pairs"
if ! step_done pairs; then
  # eval.generate itself continues an interrupted file (ids already written are skipped).
  python -m eval.generate --model-path "$OUT/sft" --data "$SETS/data_train.json" --image-folder "$DATA" \
    --out "$OUT/sft_train_greedy.jsonl" --batch-size 64 --max-new-tokens 8 >/dev/null
  for sample in 1 2; do
    python -m eval.generate --model-path "$OUT/sft" --data "$SETS/data_train.json" --image-folder "$DATA" \
      --out "$OUT/sft_train_sampled$sample.jsonl" --batch-size 64 --max-new-tokens 8 --temperature 1 \
      --seed "$(( SEED * 10 + sample ))" >/dev/null
  done
  python scripts/dpo_pairs.py --data "$SETS/data_train.json" --out "$OUT/pairs.json" \
    --preds "$OUT/sft_train_greedy.jsonl" "$OUT/sft_train_sampled1.jsonl" "$OUT/sft_train_sampled2.jsonl"
  python -m data_tools.validate --data "$OUT/pairs.json" --image-folder "$DATA" >/dev/null
  mark_done pairs
fi

step "4/6 DPO from the SFT model (full, frozen reference, beta 0.1, SFT term 1.0), and the SFT control"
trained dpo || python llava_tiny/train/train_dpo.py --model_name_or_path "$OUT/sft" --unfreeze_mm_vision_tower True \
  --data_path "$OUT/pairs.json" --output_dir "$OUT/dpo" --max_steps "$DPO_STEPS" --learning_rate 1e-4 \
  --warmup_ratio 0.05 --lr_scheduler_type cosine --dpo_beta 0.1 --dpo_sft_weight 1.0 "${COMMON[@]}"
python - "$OUT/pairs.json" "$OUT/chosen_sft.json" <<'PY'
import json, sys
pairs = json.load(open(sys.argv[1]))
json.dump([{"id": p["id"], "image": p["image"], "conversations": [{"from": "human", "value": p["prompt"]},
            {"from": "gpt", "value": p["chosen"]}]} for p in pairs], open(sys.argv[2], "w"))
PY
trained sft_more || python llava_tiny/train/train.py --model_name_or_path "$OUT/sft" --unfreeze_mm_vision_tower True \
  --data_path "$OUT/chosen_sft.json" --output_dir "$OUT/sft_more" --max_steps "$DPO_STEPS" --learning_rate 1e-4 \
  --warmup_ratio 0.05 --lr_scheduler_type cosine "${COMMON[@]}"

if step_done report; then
  step "5/6, 6/6 test split and report: done in an earlier run"
  cat "$OUT/report.md"
  echo "done: $OUT/report.md"
  exit 0
fi
step "5/6 the test split: SFT, DPO, the SFT control; DPO on blank images"
for run in sft dpo sft_more; do
  python -m eval.generate --model-path "$OUT/$run" --data "$SETS/data_test.json" --image-folder "$DATA" \
    --out "$OUT/${run}_test_preds.jsonl" --batch-size 64 --max-new-tokens 8 >/dev/null
  python -m eval.score "$OUT/${run}_test_preds.jsonl" --out "$OUT/${run}_scores" >/dev/null
done
python -m eval.generate --model-path "$OUT/dpo" --data "$SETS/data_test.json" --image-folder "$DATA" \
  --out "$OUT/dpo_test_blind.jsonl" --batch-size 64 --max-new-tokens 8 --blank-images >/dev/null
python -m eval.score "$OUT/dpo_test_preds.jsonl" --blind "$OUT/dpo_test_blind.jsonl" \
  --train-data "$SETS/data_train.json" --out "$OUT/dpo_scores" >/dev/null

step "6/6 report (test split accuracy)"
python - "$OUT" <<'PY' | tee "$OUT/report.md"
import json, sys
out = sys.argv[1]
runs = {name: json.load(open(f"{out}/{run}_scores/metrics.json"))
        for name, run in (("SFT (brief)", "sft"), ("DPO", "dpo"), ("SFT control", "sft_more"))}
looking = runs["DPO"]["looking"]["by_question_type"]
types = sorted(looking)
print("| model | " + " | ".join(types) + " | mean |\n|---|" + "---|" * (len(types) + 1))
for name, metrics in runs.items():
    acc = [metrics["per_question_type"][t]["accuracy"] for t in types]
    print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {sum(acc) / len(acc):.2f} |")
for key, name in (("blind", "DPO, blank images"), ("majority", "majority class")):
    acc = [looking[t][key] for t in types]
    print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {sum(acc) / len(acc):.2f} |")
PY
mark_done report
echo "done in $(( $(date +%s) - start ))s: $OUT/report.md"
