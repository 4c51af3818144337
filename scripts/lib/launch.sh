# Shared by the training scripts: launch train_mem.py with DeepSpeed on this machine or, with
# HOSTFILE set, on every node it lists ("node1 slots=8" per line; passwordless ssh between nodes).
#   NUM_GPUS   GPUs on this machine (default: all)        HOSTFILE  several nodes
#   MASTER_PORT (default: a free one, see free_port)      ZERO      zero2 | zero3 | zero3_offload
#   ENTRY      the training script (default llava_tiny/train/train_mem.py; dpo.sh: train_dpo.py)

# A TCP port that nothing on this machine listens on now: the kernel's pick for port 0, a random port of
# its ephemeral range. A fixed default (DeepSpeed's 29500, the demo's old 29511) killed the second job
# started on a machine, after minutes of start-up, with EADDRINUSE. The port is free when picked, not
# reserved: another process could bind it before rank 0 does (seconds later; after DeepSpeed's op build
# on a first CPU run). We accept that race rather than retry: two jobs picking at once get different
# random ports, fixed-port jobs sit below the ephemeral range, and if it ever hits, the job stops with
# EADDRINUSE and the same command, rerun, resumes from the last checkpoint. With HOSTFILE the port must
# be free on the first node listed (the master): start there, as docs/training.md says, or set MASTER_PORT.
free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

launch() {
  local root port=${MASTER_PORT:-}
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  if [ -z "$port" ]; then
    port=$(free_port)
    echo "launch: MASTER_PORT not set; using port $port (free on this machine)" >&2
  fi
  local args=(--master_port "$port")
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
