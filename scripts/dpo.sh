#!/usr/bin/env bash
# Preference tuning (DPO) after fine-tuning: LoRA adapters on the LLM (the reference is the same model
# with its adapters off, so the projector stays frozen), beta 0.1, sigmoid loss. Data: preference
# pairs (docs/dpo.md, "Preference data"); check them first with python -m data_tools.validate.
#   MODEL        the fine-tuned folder to start from (full or LoRA, from finetune_*.sh); MODEL= starts
#                from LLM + VISION_TOWER (+ PROJECTOR, a stage-1 folder) instead
#   VISION_TOWER="" a text-only run: MODEL a text-only folder (full or LoRA), or MODEL= with LLM alone
#   DATA, EVAL_DATA, IMAGES, OUT, ZERO, NUM_GPUS, HOSTFILE, MASTER_PORT, REPORT_TO, VERSION: as finetune_lora.sh
# Extra flags go to train_dpo.py, e.g. --dpo_beta 0.2 --dpo_loss ipo --dpo_sft_weight 1.0, or full
# fine-tuning: --lora_enable False --freeze_mm_mlp_adapter False --learning_rate 5e-7.
set -euo pipefail
MODEL=${MODEL-checkpoints/llava-tinyllama-lora}
LLM=${LLM:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}
VISION_TOWER=${VISION_TOWER-openai/clip-vit-large-patch14-336}  # "": a text-only run (no projector, no images)
PROJECTOR=${PROJECTOR-${VISION_TOWER:+checkpoints/llava-tinyllama-pretrain}}
DATA=${DATA:-data/sets/pairs_train.json}
EVAL_DATA=${EVAL_DATA:-}
IMAGES=${IMAGES-${VISION_TOWER:+data/imagenes}}
OUT=${OUT:-checkpoints/llava-tinyllama-dpo}
ZERO=${ZERO:-zero3}
if [ -n "$MODEL" ]; then
  START=(--model_name_or_path "$MODEL")
else
  START=(--model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" ${PROJECTOR:+--pretrain_mm_mlp_adapter "$PROJECTOR"})
fi
source "$(dirname "$0")/lib/launch.sh"
ENTRY=llava_tiny/train/train_dpo.py launch \
  --lora_enable True --lora_r 128 --lora_alpha 256 --freeze_mm_mlp_adapter True \
  --dpo_beta 0.1 --dpo_loss sigmoid "${START[@]}" --version "${VERSION:-v1}" --data_path "$DATA" \
  ${EVAL_DATA:+--eval_data_path "$EVAL_DATA" --eval_strategy steps --eval_steps 200} --image_folder "$IMAGES" \
  --output_dir "$OUT" --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 True --num_train_epochs 1 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 \
  --gradient_accumulation_steps 1 --save_strategy steps --save_steps 500 --save_total_limit 1 \
  --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.1 --lr_scheduler_type cosine \
  --logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True \
  --dataloader_num_workers 4 --report_to "${REPORT_TO:-none}" "$@"
