#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole suite on the CPU.
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # skip the multi-process and long tests
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its CPU comm op once (~45 s); keep it between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec .venv/bin/python -m pytest -q "$@"
