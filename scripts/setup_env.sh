#!/usr/bin/env bash
# Create .venv and install llava-tiny with its training, evaluation, serving and test extras.
# torch is pinned first: 2.13.0 is the local CPU wheel on our machines, and asking for it first keeps
# pip from pulling a multi-GB CUDA build. On a GPU machine set TORCH_SPEC (e.g. "torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.llava-tiny-installed"
want="$(sha256sum setup.py | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  "$VENV/bin/pip" install -q -e ".[train,eval,serve,dev]"
  echo "$want" > "$stamp"
fi
