# Shared by the training scripts: launch train_mem.py with DeepSpeed on this machine or, with
# HOSTFILE set, on every node it lists ("node1 slots=8" per line; passwordless ssh between nodes).
#   NUM_GPUS   GPUs on this machine (default: all)        HOSTFILE  several nodes
#   MASTER_PORT (default 29500)                           ZERO      zero2 | zero3 | zero3_offload
#   ENTRY      the training script (default llava_tiny/train/train_mem.py; dpo.sh: train_dpo.py)
launch() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  local args=(--master_port "${MASTER_PORT:-29500}")
  if [ -n "${HOSTFILE:-}" ]; then
    args+=(--hostfile "$HOSTFILE")
  elif [ -n "${NUM_GPUS:-}" ]; then
    args+=(--num_gpus "$NUM_GPUS")
  fi
  if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu  # no GPU: DeepSpeed on the CPU with gloo (slow; for checks and demos)
  fi
  (cd "$root" && deepspeed "${args[@]}" "${ENTRY:-llava_tiny/train/train_mem.py}" \
    --deepspeed "zero_configs/${ZERO:-zero3}.json" "$@")
}
