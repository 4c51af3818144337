#!/usr/bin/env bash
# Stage 2, LoRA: adapters on the LLM's linear layers + the projector at its own learning rate.
# (The seed users' command: LLaVA-1.5's finetune_lora.sh with a TinyLlama + CLIP-L/336 base.)
set -euo pipefail
LLM=${LLM:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}
VISION_TOWER=${VISION_TOWER-openai/clip-vit-large-patch14-336}  # "": a text-only run (no projector, no images)
PROJECTOR=${PROJECTOR-${VISION_TOWER:+checkpoints/llava-tinyllama-pretrain}}
DATA=${DATA:-data/sets/data_train.json}
EVAL_DATA=${EVAL_DATA:-}
IMAGES=${IMAGES-${VISION_TOWER:+data/imagenes}}
OUT=${OUT:-checkpoints/llava-tinyllama-lora}
ZERO=${ZERO:-zero3}
source "$(dirname "$0")/lib/launch.sh"
launch \
  --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
  --model_name_or_path "$LLM" --version "${VERSION:-v1}" --vision_tower "$VISION_TOWER" \
  ${PROJECTOR:+--pretrain_mm_mlp_adapter "$PROJECTOR"} --data_path "$DATA" \
  ${EVAL_DATA:+--eval_data_path "$EVAL_DATA"} --image_folder "$IMAGES" --output_dir "$OUT" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False \
  --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 True --num_train_epochs 1 --per_device_train_batch_size 16 --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps 1 --evaluation_strategy no --save_strategy steps --save_steps 50000 \
  --save_total_limit 1 --learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True \
  --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-none}" "$@"
