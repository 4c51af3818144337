# Shared by demo.sh and demo_dpo.sh: the --out folder of a demo, claimed once and continued by a rerun.
# The demo writes demo_args.txt (its script and arguments) into --out before anything else, and adds a line
# to demo_steps_done.txt as each step finishes. The same command, rerun after an interruption, skips the
# finished steps and continues the others (training resumes from its last checkpoint, eval.generate from
# its last prediction); other arguments, or a folder the demo did not make, are refused and left untouched.
DEMO_ARGS_FILE=demo_args.txt
DEMO_STEPS_FILE=demo_steps_done.txt

# claim_out SCRIPT OUT ARG...: make OUT this run's folder, or continue it; exit 2 when it holds anything else.
# ARGs are the run's settings, one "--flag value" each, in a fixed order (what makes a run the same run).
claim_out() {
  local script=$1 out=$2 wanted
  shift 2
  wanted=$(printf '%s\n' "script $script" "$@")
  if [ -z "$(ls -A "$out" 2>/dev/null)" ] && [ ! -f "$out" ]; then
    mkdir -p "$out"
    printf '%s\n' "$wanted" > "$out/$DEMO_ARGS_FILE"
    return 0
  fi
  if [ ! -f "$out/$DEMO_ARGS_FILE" ]; then
    echo "$script: $out is not empty and was not made by a demo (no $DEMO_ARGS_FILE in it); choose another --out" \
         "(nothing is overwritten)" >&2
    exit 2
  fi
  local before
  before=$(cat "$out/$DEMO_ARGS_FILE")
  if [ "$before" != "$wanted" ]; then
    echo "$script: $out holds a demo run with other arguments:" >&2
    _differences "$before" "$wanted" "$out" >&2
    echo "rerun with its arguments to continue it, or choose another --out (nothing is overwritten)" >&2
    exit 2
  fi
  local done_steps
  done_steps=$(paste -sd, "$out/$DEMO_STEPS_FILE" 2>/dev/null || true)
  echo "$script: continuing the interrupted run in $out (steps done: ${done_steps:-none}); finished steps are skipped"
}

# Lines "KEY VALUE" of two settings lists, as "  KEY: VALUE (in OUT) != VALUE (now)" for each key that differs.
_differences() {
  local -A then now
  local line key
  while IFS= read -r line; do then[${line%% *}]=${line#* }; done <<< "$1"
  while IFS= read -r line; do now[${line%% *}]=${line#* }; done <<< "$2"
  for key in $(printf '%s\n' "${!then[@]}" "${!now[@]}" | sort -u); do
    if [ "${then[$key]-(unset)}" != "${now[$key]-(unset)}" ]; then
      echo "  $key: '${then[$key]-(unset)}' (in $3) != '${now[$key]-(unset)}' (now)"
    fi
  done
}

# step_done NAME: whether this run finished step NAME before (needs OUT set by the demo).
step_done() { grep -qxF "$1" "$OUT/$DEMO_STEPS_FILE" 2>/dev/null; }
# mark_done NAME: record that step NAME finished (a kill before this line redoes the step on the rerun).
mark_done() { echo "$1" >> "$OUT/$DEMO_STEPS_FILE"; }
