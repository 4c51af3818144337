#!/usr/bin/env bash
# Stage 2, full fine-tuning: LLM + projector, starting from a stage-1 projector.
set -euo pipefail
LLM=${LLM:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}
VISION_TOWER=${VISION_TOWER-openai/clip-vit-large-patch14-336}  # "": a text-only run (no projector, no images)
PROJECTOR=${PROJECTOR-${VISION_TOWER:+checkpoints/llava-tinyllama-pretrain}}
DATA=${DATA:-data/sets/data_train.json}
EVAL_DATA=${EVAL_DATA:-}
IMAGES=${IMAGES-${VISION_TOWER:+data/imagenes}}
OUT=${OUT:-checkpoints/llava-tinyllama-full}
ZERO=${ZERO:-zero3}
source "$(dirname "$0")/lib/launch.sh"
launch \
  --model_name_or_path "$LLM" --version "${VERSION:-v1}" --vision_tower "$VISION_TOWER" \
  ${PROJECTOR:+--pretrain_mm_mlp_adapter "$PROJECTOR"} --data_path "$DATA" ${EVAL_DATA:+--eval_data_path "$EVAL_DATA"} \
  --image_folder "$IMAGES" --output_dir "$OUT" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False \
  --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 True --num_train_epochs 1 --per_device_train_batch_size 16 --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps 1 --evaluation_strategy no --save_strategy steps --save_steps 1000 \
  --save_total_limit 2 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True \
  --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-none}" "$@"
