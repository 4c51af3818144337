#!/usr/bin/env bash
# Stage 2, QLoRA: the LLM in 4-bit NF4 (double quantization), LoRA adapters in bf16; fits small cards.
set -euo pipefail
LLM=${LLM:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}
VISION_TOWER=${VISION_TOWER-openai/clip-vit-large-patch14-336}  # "": a text-only run (no projector, no images)
PROJECTOR=${PROJECTOR-${VISION_TOWER:+checkpoints/llava-tinyllama-pretrain}}
DATA=${DATA:-data/sets/data_train.json}
IMAGES=${IMAGES-${VISION_TOWER:+data/imagenes}}
OUT=${OUT:-checkpoints/llava-tinyllama-qlora}
ZERO=${ZERO:-zero2}
source "$(dirname "$0")/lib/launch.sh"
launch \
  --lora_enable True --bits 4 --double_quant True --quant_type nf4 --lora_r 64 --lora_alpha 16 \
  --mm_projector_lr 2e-5 --optim paged_adamw_8bit \
  --model_name_or_path "$LLM" --version "${VERSION:-v1}" --vision_tower "$VISION_TOWER" \
  ${PROJECTOR:+--pretrain_mm_mlp_adapter "$PROJECTOR"} --data_path "$DATA" --image_folder "$IMAGES" \
  --output_dir "$OUT" --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --image_aspect_ratio pad --group_by_modality_length True --bf16 True --num_train_epochs 1 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --evaluation_strategy no \
  --save_strategy steps --save_steps 1000 --save_total_limit 1 --learning_rate 2e-4 --weight_decay 0. \
  --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --model_max_length 2048 \
  --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-none}" "$@"
