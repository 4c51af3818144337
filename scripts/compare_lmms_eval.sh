#!/usr/bin/env bash
# A model of ours evaluated by the community's harness, lmms-eval 0.7.3 (`--model llava_hf`, stock
# transformers), and by eval.generate on the same split: the two answer sets compared question by question.
# Not part of the test suite: lmms-eval comes from the package registry into a virtual environment of its own.
#
#   bash scripts/compare_lmms_eval.sh --model runs/demo/model --data runs/demo/data/sets/data_test.json \
#        --image-folder runs/demo/data [--out runs/lmms_compare] [--max-new-tokens 24] [--limit N] [--device cuda]
#
# LMMS_VENV (default .venv/lmms-eval-0.7.3): where lmms-eval is installed, once. The quirks of that release,
# each met on a CPU machine: its llava_hf imports `decord` at the top (installed here); `filelock<4`; the
# registry's torchvision for our torch is a CUDA build that breaks imports on a CPU, and without a pinned
# torch it pulls a newer CUDA torch (several GB): torch is pinned to ours and torchvision removed
# (transformers falls back to PIL processors); `device_map=cpu` on a CPU (its default "" is refused by
# transformers 5); and it exits 0 after a failed model import unless `--verbosity DEBUG`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="" DATA="" IMAGE_FOLDER="" OUT=runs/lmms_compare MAX_NEW_TOKENS=24 LIMIT="" DEVICE=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --image-folder) IMAGE_FOLDER=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --max-new-tokens) MAX_NEW_TOKENS=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "compare_lmms_eval.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$MODEL" ] && [ -n "$DATA" ] || { echo "compare_lmms_eval.sh: --model and --data are required" >&2; exit 2; }
start=$(date +%s)
step() { printf '\n== [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1

LMMS_VENV=${LMMS_VENV:-.venv/lmms-eval-0.7.3}
# lmms-eval runs with our torch and transformers, so that a difference is lmms-eval's, not a version's.
versions=$(python -c "import torch, transformers; print(torch.__version__.split('+')[0], transformers.__version__)")
read -r TORCH_VERSION TRANSFORMERS_VERSION <<< "$versions"
want="lmms-eval==0.7.3 torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION"
if [ "$(cat "$LMMS_VENV/.installed" 2>/dev/null)" != "$want" ]; then
  step "install $want into $LMMS_VENV (once; ~10 min, mostly lmms-eval's own dependencies)"
  python3 -m venv "$LMMS_VENV"
  "$LMMS_VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  "$LMMS_VENV/bin/pip" install -q lmms-eval==0.7.3 decord "filelock<4" "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION"
  "$LMMS_VENV/bin/pip" uninstall -q -y torchvision
  echo "$want" > "$LMMS_VENV/.installed"
fi

step "the lmms-eval task from $DATA"
python -m eval.lmms_task --data "$DATA" ${IMAGE_FOLDER:+--image-folder "$IMAGE_FOLDER"} --out "$OUT/task" \
  --task llava_tiny_compare --max-new-tokens "$MAX_NEW_TOKENS"
if [ "$DEVICE" = cpu ]; then
  MODEL_ARGS="pretrained=$MODEL,device=cpu,device_map=cpu,dtype=float32"
else  # the dtype eval.generate takes on a GPU (llava_tiny.model.assembly.resolve_dtype)
  dtype=$(python -c "import torch; print('bfloat16' if torch.cuda.is_bf16_supported() else 'float16')")
  device_map=$DEVICE; [ "$device_map" != cuda ] || device_map=cuda:0
  MODEL_ARGS="pretrained=$MODEL,device=$DEVICE,device_map=$device_map,dtype=$dtype"
fi

step "lmms-eval --model llava_hf --model_args $MODEL_ARGS"
rm -rf "$OUT/lmms"
lmms_started=$(date +%s)
"$LMMS_VENV/bin/python" -m lmms_eval --model llava_hf --model_args "$MODEL_ARGS" --tasks llava_tiny_compare \
  --include_path "$OUT/task" --batch_size 1 --log_samples --output_path "$OUT/lmms" --verbosity DEBUG \
  ${LIMIT:+--limit "$LIMIT"} > "$OUT/lmms_eval.log" 2>&1 || { tail -n 40 "$OUT/lmms_eval.log" >&2; exit 1; }
lmms_seconds=$(( $(date +%s) - lmms_started ))
SAMPLES=$(find "$OUT/lmms" -name '*_samples_llava_tiny_compare.jsonl' | head -n 1)
[ -n "$SAMPLES" ] || { echo "compare_lmms_eval.sh: lmms-eval wrote no samples (log: $OUT/lmms_eval.log)" >&2; exit 1; }

step "eval.generate on the same split"
QUESTIONS=$DATA
if [ -n "$LIMIT" ]; then  # the questions lmms-eval answered (--limit: the first N)
  QUESTIONS=$OUT/questions.json
  python -c "import json, sys; from llava_tiny.data import load_samples
json.dump(load_samples(sys.argv[1])[:int(sys.argv[3])], open(sys.argv[2], 'w'))" "$DATA" "$QUESTIONS" "$LIMIT"
fi
rm -f "$OUT/preds.jsonl"
generate_started=$(date +%s)
python -m eval.generate --model-path "$MODEL" --data "$QUESTIONS" ${IMAGE_FOLDER:+--image-folder "$IMAGE_FOLDER"} \
  --out "$OUT/preds.jsonl" --batch-size 16 --max-new-tokens "$MAX_NEW_TOKENS" --device "$DEVICE" 2> "$OUT/generate.log"
generate_seconds=$(( $(date +%s) - generate_started ))

step "answers compared (lmms-eval ${lmms_seconds}s, eval.generate ${generate_seconds}s)"
python -m eval.lmms_compare --lmms-samples "$SAMPLES" --task-data "$OUT/task/llava_tiny_compare.jsonl" \
  --preds "$OUT/preds.jsonl" --out "$OUT/comparison.json"
