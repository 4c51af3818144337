#!/usr/bin/env bash
# The main job, end to end, on any machine: synthesize -> validate -> partition (by image) ->
# train with train_mem.py under DeepSpeed ZeRO-2 -> batched generation (and a blind control with
# blank images) -> scores, plots and a report that says whether the model looks at the image.
#
#   bash scripts/demo.sh [--out runs/demo] [--seed 0] [--images 3000] [--steps 2000]
#   bash scripts/demo.sh --task small-objects --out runs/small   # one 12-px shape in 64-px images
#   bash scripts/demo.sh --data DATA [--image-folder DIR] [--stratify label] [--group-by FIELD] \
#        [--keep-split [FIELD]] [--split-value test=validation] \
#        [--image-size 32] --out runs/mine     # your converted data (DATA: a folder with dataset.json,
#                                              # or a JSON/JSONL file; images relative to its folder)
#   any of them: [--max-new-tokens N] (default: the longest training answer's tokens + a margin)
#                [--patch-size 16] [--vision-layers 2] (the from-scratch tower)
#   bash scripts/demo.sh --model_name_or_path TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
#        --vision_tower openai/clip-vit-large-patch14-336     # GPU: the real two-stage recipe
#
# Without real weights (none can be downloaded here) the models are tiny and random, so every part
# (tower, projector, LLM) is trained from scratch: the "from-scratch variant".
# Rerun the same command after an interruption to continue in its --out (scripts/lib/demo_out.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/demo_out.sh
OUT=runs/demo SEED=0 IMAGES="" STEPS="" LLM="" TOWER="" USER_DATA="" IMAGE_FOLDER="" STRATIFY="" GROUP_BY=()
IMAGE_SIZE="" PATCH_SIZE="" VISION_LAYERS="" TASK=shapes MAX_NEW_TOKENS="" KEEP_SPLIT="" SPLIT_VALUES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --data) USER_DATA=$2; shift 2 ;;
    --image-folder) IMAGE_FOLDER=$2; shift 2 ;;
    --stratify) STRATIFY=$2; shift 2 ;;
    --group-by) GROUP_BY+=(--group-by "$2"); GROUP_FIELDS="${GROUP_FIELDS:-}${GROUP_FIELDS:+ }$2"; shift 2 ;;
    --image-size) IMAGE_SIZE=$2; shift 2 ;;
    --patch-size) PATCH_SIZE=$2; shift 2 ;;
    --vision-layers) VISION_LAYERS=$2; shift 2 ;;
    --task) TASK=$2; shift 2 ;;
    --max-new-tokens) MAX_NEW_TOKENS=$2; shift 2 ;;
    --keep-split)  # an optional FIELD (default "split") unless the next word is a flag
      if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then KEEP_SPLIT=$2; shift 2; else KEEP_SPLIT=split; shift; fi ;;
    --split-value) SPLIT_VALUES+=(--split-value "$2"); shift 2 ;;
    --model_name_or_path) LLM=$2; shift 2 ;;
    --vision_tower) TOWER=$2; shift 2 ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
fail() { echo "demo.sh: $*" >&2; exit 2; }
if [ -n "$USER_DATA" ]; then
  [ -z "$IMAGES" ] || fail "--images draws the synthetic set; it cannot be combined with --data"
  if [ -d "$USER_DATA" ]; then
    DATA_FILE=$(ls "$USER_DATA"/dataset.json "$USER_DATA"/dataset.jsonl 2>/dev/null | head -n 1 || true)
    [ -n "$DATA_FILE" ] || fail "--data $USER_DATA: no dataset.json or dataset.jsonl in it (python -m data_tools.convert ... --out $USER_DATA/dataset.json writes one)"
  elif [ -f "$USER_DATA" ]; then
    DATA_FILE=$USER_DATA
  else
    fail "--data $USER_DATA: no such file or folder"
  fi
  IMAGE_FOLDER=${IMAGE_FOLDER:-$(dirname "$DATA_FILE")}
  [ -d "$IMAGE_FOLDER" ] || fail "--image-folder $IMAGE_FOLDER: no such folder"
elif [ -n "$IMAGE_FOLDER" ]; then
  fail "--image-folder goes with --data (the synthetic set brings its own images)"
fi
[ -z "$KEEP_SPLIT" ] || [ -n "$USER_DATA" ] || fail "--keep-split keeps the split of your --data; the synthetic set has none"
[ ${#SPLIT_VALUES[@]} -eq 0 ] || [ -n "$KEEP_SPLIT" ] || fail "--split-value names values of the --keep-split field; add --keep-split"
case "$MAX_NEW_TOKENS" in ""|[1-9]|[1-9][0-9]|[1-9][0-9][0-9]|[1-9][0-9][0-9][0-9]) ;;
  *) fail "--max-new-tokens $MAX_NEW_TOKENS: expected a whole number from 1 to 9999" ;; esac
# A task is a synthetic data set and the from-scratch tower that learns it (each setting can be overridden).
case "$TASK" in
  shapes) TASK_SIZE=32 TASK_PATCH=16 TASK_LAYERS=2 TASK_STEPS=2000 ;;
  # One 12-px shape somewhere in 64 px: 8-px patches (an 8x8 grid, the shape spans 2-4 patches), a deeper tower.
  small-objects) TASK_SIZE=64 TASK_PATCH=8 TASK_LAYERS=3 TASK_STEPS=2000 ;;
  *) fail "--task $TASK: expected shapes or small-objects" ;;
esac
[ "$TASK" = shapes ] || [ -z "$USER_DATA" ] || fail "--task $TASK draws a synthetic set; it cannot be combined with --data"
IMAGE_SIZE=${IMAGE_SIZE:-$TASK_SIZE} PATCH_SIZE=${PATCH_SIZE:-$TASK_PATCH} VISION_LAYERS=${VISION_LAYERS:-$TASK_LAYERS}
STEPS=${STEPS:-$TASK_STEPS} IMAGES=${IMAGES:-3000}
if [ $(( IMAGE_SIZE % PATCH_SIZE )) -ne 0 ] || [ "$IMAGE_SIZE" -lt "$PATCH_SIZE" ]; then
  fail "--image-size $IMAGE_SIZE: expected a multiple of the tiny tower's $PATCH_SIZE-px patch (--patch-size)"
fi
claim_out demo.sh "$OUT" "--seed $SEED" "--images $IMAGES" "--steps $STEPS" "--data $USER_DATA" \
  "--image-folder $IMAGE_FOLDER" "--stratify $STRATIFY" "--group-by ${GROUP_FIELDS:-}" "--image-size $IMAGE_SIZE" \
  "--model_name_or_path $LLM" "--vision_tower $TOWER" "--task $TASK" "--patch-size $PATCH_SIZE" \
  "--vision-layers $VISION_LAYERS" "--max-new-tokens $MAX_NEW_TOKENS" "--keep-split $KEEP_SPLIT" \
  "--split-value ${SPLIT_VALUES[*]:-}"
start=$(date +%s)
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions} HF_HUB_DISABLE_PROGRESS_BARS=1
PY=python
step() { printf '\n== [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
SETS=$OUT/data/sets MODEL=$OUT/model
if [ -z "$USER_DATA" ]; then
  IMAGE_FOLDER=$OUT/data DATA_FILE=$OUT/data/dataset.json
  STRATIFY=${STRATIFY:-scene}  # every split shows each scene in the same proportion: balanced answers
else
  STRATIFY=${STRATIFY:-label}  # what convert imagefolder writes: every class in every split
fi
if step_done data; then
  step "1/5 data: done in an earlier run ($SETS)"
else
  if [ -z "$USER_DATA" ]; then
    step "1/5 data: synthesize, validate, partition by image"
    # --overwrite: an interrupted data step of this run is redone (same seed, same files)
    if [ "$TASK" = small-objects ]; then
      $PY -m data_tools.synthesize --variant small-objects --out-dir "$IMAGE_FOLDER" --num-images "$IMAGES" \
        --image-size "$IMAGE_SIZE" --seed "$SEED" --overwrite
    else
      $PY -m data_tools.synthesize --out-dir "$IMAGE_FOLDER" --num-images "$IMAGES" --image-size "$IMAGE_SIZE" \
        --layout grid --objects alike --question-types color shape count presence caption --seed "$SEED" --overwrite
    fi
  else
    step "1/5 data: validate $DATA_FILE (images in $IMAGE_FOLDER), partition by image"
  fi
  if ! $PY -m data_tools.validate --data "$DATA_FILE" --image-folder "$IMAGE_FOLDER" --report "$OUT/validate_report.json"; then
    echo "demo.sh: $DATA_FILE has errors (listed above, all in $OUT/validate_report.json): fix them, or drop" \
         "those samples with python -m data_tools.validate ... --write-clean clean.json and pass --data clean.json" >&2
    exit 1
  fi
  # Stratified by a field (a missing field is one stratum): each class or scene in every split in proportion.
  # --keep-split: the records' own split (a val split, when there is none, is drawn from train the same way).
  KEEP=(); [ -z "$KEEP_SPLIT" ] || KEEP=(--keep-split "$KEEP_SPLIT" "${SPLIT_VALUES[@]}")
  $PY -m data_tools.partition --data "$DATA_FILE" --image-folder "$IMAGE_FOLDER" --out-dir "$SETS" --seed "$SEED" \
    --stratify "$STRATIFY" "${KEEP[@]}"
  mark_done data
fi

COMMON=(--data_path "$SETS/data_train.json" --eval_data_path "$SETS/data_val.json" --image_folder "$IMAGE_FOLDER"
        --image_aspect_ratio pad --report_to none --seed "$SEED"
        --dataloader_num_workers 1 --logging_steps 25 --logging_first_step True)
# A finished training run has its trainer_state.json (train/run_dir.py refuses to train it again); an
# interrupted one resumes from its newest checkpoint when rerun with the same flags.
if [ -f "$MODEL/trainer_state.json" ]; then
  step "2/5 train: done in an earlier run ($MODEL)"
elif [ -z "$LLM" ]; then
  step "2/5 train (from-scratch variant: tiny random LLM + tower, every part trained)"
  echo "No pretrained weights here, so the tower, the projector and the LLM all train from scratch."
  echo "With real weights the GPU scripts run the two-stage recipe instead:"
  echo "  bash scripts/pretrain.sh        # stage 1: projector only (LLM and tower frozen)"
  echo "  bash scripts/finetune_lora.sh   # stage 2: LoRA on the LLM + projector, from stage 1"
  echo "(this script does the same with --model_name_or_path/--vision_tower)"
  # A 0.7M-parameter model gains nothing from a second thread, and two threads fighting the
  # data-loader worker for two cores made each step ~6x slower: one thread, one worker.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # On your data the tokenizer learns the training split's own words: an answer is a token, not letters.
  TOKENIZER_FROM=(); [ -z "$USER_DATA" ] || TOKENIZER_FROM=(--tokenizer-from "$SETS/data_train.json")
  if ! step_done base; then
    $PY -m llava_tiny.testing.tiny --out "$OUT/base" --hidden 128 --layers 2 --image-size "$IMAGE_SIZE" \
      --patch-size "$PATCH_SIZE" --vision-hidden 64 --vision-layers "$VISION_LAYERS" --seed "$SEED" "${TOKENIZER_FROM[@]}" \
      >/dev/null
    mark_done base
  fi
  # A checkpoint every quarter of the run (the newest kept) for a rerun to resume from; the port is a free one.
  NUM_GPUS=1 ZERO=zero2 bash -c 'source scripts/lib/launch.sh; launch "$@"' _ \
    --model_name_or_path "$OUT/base/llm" --vision_tower "$OUT/base/clip" --version tinyllama \
    --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --unfreeze_mm_vision_tower True \
    --output_dir "$MODEL" --max_steps "$STEPS" --per_device_train_batch_size 32 --per_device_eval_batch_size 64 \
    --learning_rate 1e-3 --warmup_ratio 0.05 --lr_scheduler_type cosine --weight_decay 0. --packing True \
    --eval_strategy steps --eval_steps $(( STEPS / 2 )) --save_strategy steps \
    --save_steps $(( STEPS >= 4 ? STEPS / 4 : 1 )) --save_total_limit 1 "${COMMON[@]}"
else
  step "2/5 train: the two-stage recipe on real weights ($LLM + $TOWER)"
  if [ ! -f "$OUT/stage1/trainer_state.json" ]; then
    LLM="$LLM" VISION_TOWER="$TOWER" DATA="$SETS/data_train.json" IMAGES="$IMAGE_FOLDER" OUT="$OUT/stage1" \
      bash scripts/pretrain.sh --num_train_epochs 1 --per_device_train_batch_size 16 --save_strategy no
  fi
  LLM="$LLM" VISION_TOWER="$TOWER" PROJECTOR="$OUT/stage1" DATA="$SETS/data_train.json" \
    EVAL_DATA="$SETS/data_val.json" IMAGES="$IMAGE_FOLDER" OUT="$MODEL" \
    bash scripts/finetune_lora.sh --num_train_epochs 3 --save_strategy no --eval_strategy epoch
fi
if [ ! -f "$MODEL/trainer_state.json" ]; then  # stopped by a signal: launch.sh returns 0 once every rank saved
  echo "demo.sh: training stopped before its last step; rerun the same command to continue it" >&2
  exit 1
fi

elapsed() { echo $(( $(date +%s) - start )); }
if step_done report; then
  step "3/5 to 5/5 generate, score, report: done in an earlier run"
  echo "report: $OUT/report.md   metrics: $OUT/metrics.json"
  exit 0
fi
# Room for the longest training answer (its tokens under the model's tokenizer, the stop token and a margin):
# a fixed 24 cut 12 of 157 captions of a user's set short.
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-$($PY scripts/lib/max_new_tokens.py --model-path "$MODEL" --data "$SETS/data_train.json")}
step "3/5 generate on the test split (batched, up to $MAX_NEW_TOKENS new tokens), then the blind control (blank images)"
# eval.generate itself continues an interrupted file (ids already written are skipped).
$PY -m eval.generate --model-path "$MODEL" --data "$SETS/data_test.json" --image-folder "$IMAGE_FOLDER" \
  --out "$OUT/preds.jsonl" --batch-size 64 --max-new-tokens "$MAX_NEW_TOKENS"
$PY -m eval.generate --model-path "$MODEL" --data "$SETS/data_test.json" --image-folder "$IMAGE_FOLDER" \
  --out "$OUT/preds_blind.jsonl" --batch-size 64 --max-new-tokens "$MAX_NEW_TOKENS" --blank-images

# Your data and the small-objects task get eval.score's per-type verdicts (any question types, groups, captions);
# the shapes task gets its goal check (eval.demo_report).
if [ -n "$USER_DATA" ] || [ "$TASK" != shapes ]; then
  step "4/5 score, with the blind control and the majority class (from the training split)"
  $PY -m eval.score "$OUT/preds.jsonl" --blind "$OUT/preds_blind.jsonl" --train-data "$SETS/data_train.json" \
    --model-path "$MODEL" "${GROUP_BY[@]}" --out "$OUT"
  mark_done report
  step "5/5 report"
  echo "report: $OUT/report.md   metrics: $OUT/metrics.json   ($(elapsed)s)"
  exit 0
fi
step "4/5 score"
$PY -m eval.score "$OUT/preds.jsonl" --out "$OUT/scores" --model-path "$MODEL"
step "5/5 report"
$PY -m eval.demo_report --preds "$OUT/preds.jsonl" --blind-preds "$OUT/preds_blind.jsonl" \
  --train "$SETS/data_train.json" --trainer-state "$MODEL/trainer_state.json" --model-config "$MODEL/config.json" \
  --caption-metrics "$OUT/scores/metrics.json" --leakage "$SETS/leakage_report.json" \
  --note "Finished in $(elapsed)s (task $TASK, seed $SEED, $IMAGES images, $STEPS steps)." --out "$OUT"
mark_done report
echo "report: $OUT/report.md   metrics: $OUT/metrics.json   ($(elapsed)s)"
