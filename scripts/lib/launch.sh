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
  # The job runs in a process group of its own. On SIGTERM/SIGUSR1 (a scheduler's preemption notice) or
  # SIGINT this shell passes the signal to the whole job and returns only once every rank has saved and
  # exited: DeepSpeed's runner dies at once on it, and a batch script that ended with it would have the
  # scheduler kill the ranks mid-save. (DeepSpeed's launcher gives the ranks 30 s after a SIGTERM.)
  local pid status=0 received=""
  (cd "$root" && exec setsid deepspeed "${args[@]}" "${ENTRY:-llava_tiny/train/train_mem.py}" \
    --deepspeed "zero_configs/${ZERO:-zero3}.json" "$@") &
  pid=$!
  for sig in TERM USR1 INT; do
    # shellcheck disable=SC2064  # $sig and $pid are fixed now
    trap "received=$sig; kill -$sig -- -$pid 2>/dev/null" "$sig"
  done
  wait "$pid" || status=$?
  if [ -n "$received" ]; then
    while kill -0 -- "-$pid" 2>/dev/null; do sleep 1; done
    echo "launch: SIG$received passed to the job; every rank has exited (each logs the step it saved)" >&2
    status=0
  fi
  trap - TERM USR1 INT
  return "$status"
}
