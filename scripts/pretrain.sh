#!/usr/bin/env bash
# Stage 1: train the projector only (LLM and vision tower frozen) on image-caption pairs.
set -euo pipefail
LLM=${LLM:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA=${DATA:-data/pretrain/blip_laion_cc_sbu_558k.json}
IMAGES=${IMAGES:-data/pretrain/images}
OUT=${OUT:-checkpoints/llava-tinyllama-pretrain}
ZERO=${ZERO:-zero2}
source "$(dirname "$0")/lib/launch.sh"
launch \
  --model_name_or_path "$LLM" --version plain --vision_tower "$VISION_TOWER" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" \
  --tune_mm_mlp_adapter True --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad \
  --bf16 True --num_train_epochs 1 --per_device_train_batch_size 32 --gradient_accumulation_steps 1 \
  --evaluation_strategy no --save_strategy steps --save_steps 500 --save_total_limit 2 \
  --learning_rate 1e-3 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --tf32 True --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 \
  --lazy_preprocess True --report_to "${REPORT_TO:-none}" "$@"
